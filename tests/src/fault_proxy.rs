//! A fault-injecting HTTP proxy on loopback, put between the webserver and a dependency (moto's EC2, a JWKS
//! endpoint) to make the dependency fail in the ways real ones do, switchable while the test runs: answer `500` at
//! once, hang (take the request and never answer), or lose the answer (forward the request, so that its side effect
//! happens, then never answer). Every request is counted by what was done to it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use poem::http::{HeaderName, StatusCode};
use poem::web::Data;
use poem::{handler, Body, EndpointExt, Request, Response, Server};
use tokio::sync::watch;

/// What the proxy does to each request it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards the request and relays the answer.
    Pass,
    /// Answers `500 Internal Server Error` (a plain-text body, as a load balancer would) without forwarding.
    Fail500,
    /// Takes the request and never answers; nothing is forwarded.
    Hang,
    /// Forwards the request (its side effect happens upstream) and never answers: the answer is lost.
    LoseAnswer,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Self::Pass => 0,
            Self::Fail500 => 1,
            Self::Hang => 2,
            Self::LoseAnswer => 3,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Fail500,
            2 => Self::Hang,
            3 => Self::LoseAnswer,
            _ => Self::Pass,
        }
    }
}

/// How many requests were treated which way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub passed: u64,
    pub failed_500: u64,
    pub hung: u64,
    pub lost_answers: u64,
}

impl FaultCounts {
    /// Requests that met a fault.
    pub fn faulted(&self) -> u64 {
        self.failed_500 + self.hung + self.lost_answers
    }
}

struct ProxyState {
    upstream: String,
    mode: AtomicU8,
    /// When set, only requests whose body contains this text meet the mode; the others pass.
    only_bodies_containing: std::sync::Mutex<Option<String>>,
    passed: AtomicU64,
    failed_500: AtomicU64,
    hung: AtomicU64,
    lost_answers: AtomicU64,
    http: reqwest::Client,
    /// Turns `true` when the proxy stops: held requests are then dropped.
    stopped: watch::Receiver<bool>,
}

/// A running proxy; stops when dropped (held requests are dropped with it).
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`, to be used in place of the upstream's base URL.
    pub url: String,
    state: Arc<ProxyState>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (a base URL such as `http://127.0.0.1:5000`) on a free loopback port, passing
    /// everything.
    pub async fn start(upstream: &str) -> Self {
        let (acceptor, port) = crate::loopback_acceptor().await;
        let (stop, stopped) = watch::channel(false);
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            mode: AtomicU8::new(Mode::Pass.code()),
            only_bodies_containing: std::sync::Mutex::new(None),
            passed: AtomicU64::new(0),
            failed_500: AtomicU64::new(0),
            hung: AtomicU64::new(0),
            lost_answers: AtomicU64::new(0),
            http: {
                whist_adapters::tls::ensure_crypto_provider();
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("an HTTP client")
            },
            stopped,
        });
        let endpoint = forward.data(state.clone());
        let server = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(endpoint).await;
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            state,
            stop,
            server,
        }
    }

    /// Switches what the proxy does to the requests it takes from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.set_mode_for(mode, None);
    }

    /// Like `set_mode`, for the requests whose body contains `text` only (an EC2 action such as
    /// `Action=RunInstances`); the others pass.
    pub fn set_mode_for(&self, mode: Mode, text: Option<&str>) {
        if let Ok(mut only) = self.state.only_bodies_containing.lock() {
            *only = text.map(str::to_string);
        }
        self.state.mode.store(mode.code(), Ordering::SeqCst);
    }

    /// What the proxy does now.
    pub fn mode(&self) -> Mode {
        Mode::from_code(self.state.mode.load(Ordering::SeqCst))
    }

    /// The requests taken so far, by what was done to them.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            passed: self.state.passed.load(Ordering::SeqCst),
            failed_500: self.state.failed_500.load(Ordering::SeqCst),
            hung: self.state.hung.load(Ordering::SeqCst),
            lost_answers: self.state.lost_answers.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.server.abort();
    }
}

/// Headers that describe one hop's connection, not the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "upgrade"
    )
}

/// Holds a request until the proxy stops (a hung dependency never answers).
async fn hold(state: &ProxyState) -> Response {
    let mut stopped = state.stopped.clone();
    let _ = stopped.wait_for(|stopped| *stopped).await;
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .finish()
}

async fn relay(state: &ProxyState, request: &Request, body: Vec<u8>) -> Result<Response, String> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes())
        .map_err(|error| error.to_string())?;
    let mut outgoing = state
        .http
        .request(method, format!("{}{path}", state.upstream));
    for (name, value) in request.headers() {
        if !hop_by_hop(name) {
            outgoing = outgoing.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = outgoing
        .body(body)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    let mut response = Response::builder()
        .status(StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY));
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length"
        ) {
            response = response.header(name.as_str(), value.as_bytes());
        }
    }
    let bytes = answer.bytes().await.map_err(|error| error.to_string())?;
    Ok(response.body(bytes.to_vec()))
}

#[handler]
async fn forward(request: &Request, body: Body, Data(state): Data<&Arc<ProxyState>>) -> Response {
    let body = body.into_vec().await.unwrap_or_default();
    let selected = state
        .only_bodies_containing
        .lock()
        .map(|only| {
            only.as_ref()
                .is_none_or(|text| String::from_utf8_lossy(&body).contains(text.as_str()))
        })
        .unwrap_or(true);
    let mode = if selected {
        Mode::from_code(state.mode.load(Ordering::SeqCst))
    } else {
        Mode::Pass
    };
    match mode {
        Mode::Pass => {
            state.passed.fetch_add(1, Ordering::SeqCst);
            relay(state, request, body).await.unwrap_or_else(|error| {
                Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(format!("the fault proxy could not reach upstream: {error}"))
            })
        }
        Mode::Fail500 => {
            state.failed_500.fetch_add(1, Ordering::SeqCst);
            Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .content_type("text/plain")
                .body("Internal Server Error (injected by the fault proxy)")
        }
        Mode::Hang => {
            state.hung.fetch_add(1, Ordering::SeqCst);
            hold(state).await
        }
        Mode::LoseAnswer => {
            state.lost_answers.fetch_add(1, Ordering::SeqCst);
            let _ = relay(state, request, body).await;
            hold(state).await
        }
    }
}
