//! A Stripe API on loopback, for tests: customers, Checkout sessions and billing-portal sessions, answered with
//! objects shaped like Stripe's, after checking each request the way Stripe does (the secret key as a bearer token,
//! a form-encoded body, idempotency keys that replay the first answer and refuse different parameters). It can be
//! made slow (`set_delay`): each request is still carried out at once (a customer is created), but its answer is
//! held back for the delay, as a Stripe that times out after doing the work would.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poem::http::StatusCode;
use poem::web::Data;
use poem::{handler, post, EndpointExt, Request, Response, Route, Server};

/// One request the fake took.
#[derive(Debug, Clone)]
pub struct FakeRequest {
    pub path: String,
    pub form: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

/// The parameters of the first request with an idempotency key, and the answer it got.
type Replay = (BTreeMap<String, String>, String);

#[derive(Default)]
struct FakeState {
    secret: String,
    requests: Mutex<Vec<FakeRequest>>,
    /// Idempotency key → (parameters, answer).
    replays: Mutex<HashMap<String, Replay>>,
    counter: Mutex<u64>,
    /// How long each answer is held back.
    delay: Mutex<Option<Duration>>,
    /// Ids of the customers created (replays excluded).
    customers: Mutex<Vec<String>>,
}

/// A running fake; stops when dropped.
pub struct StripeFake {
    pub base_url: String,
    state: Arc<FakeState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for StripeFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl StripeFake {
    /// Starts the fake on a free loopback port; it accepts `secret` as the API key.
    pub async fn start(secret: &str) -> Self {
        let state = Arc::new(FakeState {
            secret: secret.to_string(),
            ..FakeState::default()
        });
        let (acceptor, port) = crate::loopback_acceptor().await;
        let routes = Route::new()
            .at("/v1/customers", post(stripe_call))
            .at("/v1/checkout/sessions", post(stripe_call))
            .at("/v1/billing_portal/sessions", post(stripe_call))
            .data(state.clone());
        let server = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(routes).await;
        });
        Self {
            base_url: format!("http://127.0.0.1:{port}"),
            state,
            server,
        }
    }

    /// Holds every answer back for `delay` from now on (`None`: answers at once). The work is done first.
    pub fn set_delay(&self, delay: Option<Duration>) {
        if let Ok(mut current) = self.state.delay.lock() {
            *current = delay;
        }
    }

    /// The ids of the customers created so far (an idempotent replay creates none).
    pub fn customers(&self) -> Vec<String> {
        self.state
            .customers
            .lock()
            .map(|customers| customers.clone())
            .unwrap_or_default()
    }

    /// Every request taken so far, in order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.state
            .requests
            .lock()
            .map(|requests| requests.clone())
            .unwrap_or_default()
    }
}

fn stripe_error(status: StatusCode, kind: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(serde_json::json!({"error": {"type": kind, "message": message}}).to_string())
}

#[handler]
async fn stripe_call(request: &Request, body: String, state: Data<&Arc<FakeState>>) -> Response {
    let headers = request.headers();
    let authorized = headers
        .get("Authorization")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value == format!("Bearer {}", state.secret));
    if !authorized {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Invalid API Key provided",
        );
    }
    let form_encoded = headers
        .get("Content-Type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
    let Ok(pairs) = serde_urlencoded_pairs(&body) else {
        return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "bad form");
    };
    if !form_encoded && !body.is_empty() {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Stripe takes application/x-www-form-urlencoded bodies",
        );
    }
    let path = request.uri().path().to_string();
    let idempotency_key = headers
        .get("Idempotency-Key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    if let Ok(mut requests) = state.requests.lock() {
        requests.push(FakeRequest {
            path: path.clone(),
            form: pairs.clone(),
            idempotency_key: idempotency_key.clone(),
        });
    }
    if let Some(key) = &idempotency_key {
        if let Some((parameters, answer)) = state
            .replays
            .lock()
            .ok()
            .and_then(|replays| replays.get(key).cloned())
        {
            if parameters != pairs {
                return stripe_error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters",
                );
            }
            return delayed(&state, json(answer)).await;
        }
    }
    let number = state
        .counter
        .lock()
        .map(|mut counter| {
            *counter += 1;
            *counter
        })
        .unwrap_or(0);
    let now = chrono::Utc::now().timestamp();
    let field = |name: &str| pairs.get(name).cloned();
    let answer = match path.as_str() {
        "/v1/customers" => serde_json::json!({
            "id": format!("cus_fake{number:08}"),
            "object": "customer",
            "created": now,
            "livemode": false,
            "email": field("email"),
            "metadata": metadata(&pairs),
        }),
        "/v1/checkout/sessions" => {
            let Some(customer) = field("customer") else {
                return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "customer");
            };
            let id = format!("cs_test_fake{number:08}");
            serde_json::json!({
                "id": id,
                "object": "checkout.session",
                "automatic_tax": {"enabled": false, "liability": null, "status": null},
                "cancel_url": field("cancel_url"),
                "client_reference_id": field("client_reference_id"),
                "created": now,
                "custom_fields": [],
                "custom_text": {"after_submit": null, "shipping_address": null, "submit": null,
                                "terms_of_service_acceptance": null},
                "customer": customer,
                "expires_at": now + 86_400,
                "livemode": false,
                "metadata": {},
                "mode": field("mode").unwrap_or_default(),
                "payment_method_types": ["card"],
                "payment_status": "unpaid",
                "phone_number_collection": {"enabled": false},
                "shipping_options": [],
                "status": "open",
                "success_url": field("success_url"),
                "url": format!("https://checkout.stripe.test/c/pay/{id}"),
            })
        }
        "/v1/billing_portal/sessions" => {
            let Some(customer) = field("customer") else {
                return stripe_error(StatusCode::BAD_REQUEST, "invalid_request_error", "customer");
            };
            let id = format!("bps_fake{number:08}");
            serde_json::json!({
                "id": id,
                "object": "billing_portal.session",
                "configuration": "bpc_fake",
                "created": now,
                "customer": customer,
                "livemode": false,
                "return_url": field("return_url"),
                "url": format!("https://billing.stripe.test/p/session/{id}"),
            })
        }
        _ => return stripe_error(StatusCode::NOT_FOUND, "invalid_request_error", "no route"),
    }
    .to_string();
    if path == "/v1/customers" {
        if let Ok(mut customers) = state.customers.lock() {
            customers.push(format!("cus_fake{number:08}"));
        }
    }
    if let Some(key) = idempotency_key {
        if let Ok(mut replays) = state.replays.lock() {
            replays.insert(key, (pairs, answer.clone()));
        }
    }
    delayed(&state, json(answer)).await
}

/// Holds `response` back for the configured delay.
async fn delayed(state: &FakeState, response: Response) -> Response {
    let delay = state.delay.lock().ok().and_then(|delay| *delay);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

fn json(body: String) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json")
        .body(body)
}

fn metadata(pairs: &BTreeMap<String, String>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (key, value) in pairs {
        if let Some(name) = key
            .strip_prefix("metadata[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            map.insert(name.to_string(), serde_json::Value::String(value.clone()));
        }
    }
    serde_json::Value::Object(map)
}

/// Decodes `a=1&b%5Bc%5D=2` into its pairs.
fn serde_urlencoded_pairs(body: &str) -> Result<BTreeMap<String, String>, ()> {
    let mut pairs = BTreeMap::new();
    for part in body.split('&').filter(|part| !part.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        pairs.insert(decode(key)?, decode(value)?);
    }
    Ok(pairs)
}

fn decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text.get(index + 1..index + 3).ok_or(())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
                index += 2;
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8(out).map_err(|_| ())
}
