//! Cross-cutting request handling: refusal while shutting down, the 1 MiB body limit, a request id and span on
//! every request, the client's address (behind `TRUSTED_PROXIES`), request metrics labelled by route template (so
//! that unknown paths add no series and no secret in a path reaches a label or a log line), and one shape for
//! every refusal: the extractors' plain-text errors (a missing
//! token, a parameter that does not parse, a body that is not JSON, a method the route does not take) become
//! `{"error": CODE, "detail": …}` JSON, as the OpenAPI document declares, and a `405` names the route's methods in
//! `Allow`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use poem::http::{HeaderValue, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Middleware, Request, Response, Result};
use tracing::Instrument;
use uuid::Uuid;

use crate::http::openapi::Methods;
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
        .content_type(crate::http::openapi::JSON)
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
        HeaderValue::from_static(crate::http::openapi::JSON),
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
        let method = method_label(request.method());
        let path = request.uri().path().to_string();
        let route = self.route_label(&path);
        let peer = request
            .remote_addr()
            .as_socket_addr()
            .map(|address| address.ip());
        let client = ClientAddress(client_address(
            peer,
            request.headers(),
            &self.state.settings.trusted_proxies,
        ));
        request.extensions_mut().insert(client);
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .filter(|value| is_request_id(value))
            .map(str::to_string)
            // Time-ordered (UUIDv7): the index that finds a chain's events by this id then grows at its end
            // instead of taking each chain's entries at a random place.
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        // Handlers record it as the correlation and causation of the decisions the request takes.
        request
            .extensions_mut()
            .insert(RequestId(request_id.clone()));
        let span = tracing::info_span!("request", request_id = %request_id, method = %method, route = %route,
            client = %client.0, otel.name = %format_args!("{method} {route}"), otel.kind = "server",
            http.response.status_code = tracing::field::Empty);
        // A caller's (a client's, a balancer's) W3C trace context is continued: this request is a span of its trace.
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        whist_adapters::trace_context::continue_trace(
            &span,
            header(whist_adapters::trace_context::TRACEPARENT),
            header(whist_adapters::trace_context::TRACESTATE),
        );

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
        span.record("http.response.status_code", status.as_u16());
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

/// The id of the request being served (`X-Request-Id`: the client's, or a new one), for handlers: the
/// `correlation_id` and `causation_id` of every decision the request records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// Whether a client's `X-Request-Id` may be kept: 1 to 128 characters of `[A-Za-z0-9._:-]` (the contract's).
pub fn is_request_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-'))
}

impl<E> RequestContextEndpoint<E> {
    /// What metrics and logs call the route of `path`: its template, or `unmatched`. Never the path itself, which
    /// may carry ids (unbounded label values) or a secret (HireFire's token).
    fn route_label(&self, path: &str) -> String {
        if path == "/docs" || path.starts_with("/docs/") {
            return "/docs".to_string();
        }
        self.methods
            .template(path)
            .unwrap_or_else(|| "unmatched".to_string())
    }
}

/// The method as a label: one of the methods HTTP defines, `OTHER` for anything else.
fn method_label(method: &poem::http::Method) -> String {
    use poem::http::Method;
    let known = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    if known.contains(method) {
        method.to_string()
    } else {
        "OTHER".to_string()
    }
}

/// The address a request is attributed to (what the per-IP limit counts): see [`client_address`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub IpAddr);

/// The address a request comes from. A request whose peer is one of `trusted_proxies` (a load balancer) is
/// attributed to the right-most `X-Forwarded-For` address that is not a trusted proxy: everything left of it was
/// written by the client and proves nothing, so prepending addresses cannot move a client out of its budget. Any
/// other request is attributed to its peer, whatever headers it sends. An entry that is not an address stops the
/// walk at the last trusted hop, and IPv4 addresses written as IPv6 count as IPv4.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &poem::http::HeaderMap,
    trusted_proxies: &[ipnet::IpNet],
) -> IpAddr {
    let unspecified = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    let Some(peer) = peer.map(|peer| peer.to_canonical()) else {
        return unspecified;
    };
    let trusted = |address: &IpAddr| trusted_proxies.iter().any(|proxy| proxy.contains(address));
    if !trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    let mut attributed = peer;
    for entry in forwarded.iter().rev() {
        let Ok(address) = entry
            .parse::<IpAddr>()
            .map(|address| address.to_canonical())
        else {
            break;
        };
        attributed = address;
        if !trusted(&address) {
            break;
        }
    }
    attributed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> Vec<ipnet::IpNet> {
        vec!["10.0.0.0/8".parse().expect("a CIDR")]
    }

    fn forwarded(values: &[&str]) -> poem::http::HeaderMap {
        let mut headers = poem::http::HeaderMap::new();
        for value in values {
            headers.append(
                "x-forwarded-for",
                HeaderValue::from_str(value).expect("a header value"),
            );
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn a_request_from_an_untrusted_peer_is_its_peers_whatever_it_forwards() {
        assert_eq!(
            client_address(
                Some(ip("203.0.113.9")),
                &forwarded(&["198.51.100.1"]),
                &proxies()
            ),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn behind_a_trusted_proxy_the_right_most_untrusted_address_counts() {
        assert_eq!(
            client_address(
                Some(ip("10.0.0.5")),
                &forwarded(&["1.1.1.1, 198.51.100.7, 10.0.0.9"]),
                &proxies()
            ),
            ip("198.51.100.7"),
            "a prepended address is ignored; the second proxy hop is skipped"
        );
        assert_eq!(
            client_address(
                Some(ip("10.0.0.5")),
                &forwarded(&["1.1.1.1", "198.51.100.7"]),
                &proxies()
            ),
            ip("198.51.100.7"),
            "several header lines read as one list"
        );
    }

    #[test]
    fn a_trusted_peer_without_a_usable_header_is_its_own_address() {
        assert_eq!(
            client_address(Some(ip("10.0.0.5")), &forwarded(&[]), &proxies()),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_address(Some(ip("10.0.0.5")), &forwarded(&["not-an-ip"]), &proxies()),
            ip("10.0.0.5")
        );
        assert_eq!(
            client_address(
                Some(ip("::ffff:10.0.0.5")),
                &forwarded(&["198.51.100.7"]),
                &proxies()
            ),
            ip("198.51.100.7"),
            "an IPv4 peer written as IPv6 is still the proxy"
        );
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&poem::http::Method::GET), "GET");
        let odd = poem::http::Method::from_bytes(b"BREW").expect("a method");
        assert_eq!(method_label(&odd), "OTHER");
    }
}
