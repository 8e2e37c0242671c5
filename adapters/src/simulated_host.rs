//! A simulated host service (`WHIST_CLOUD=local`): it speaks the host protocol over real HTTP on a loopback
//! address of its own, exactly as a real host would: it registers with its bootstrap token, heartbeats, starts
//! mandelboxes when asked (reporting CONNECTING then RUNNING), and drains and shuts down when asked. Over HTTPS
//! (the contract's default) it serves a certificate of its own, self-signed and registered by its fingerprint, or
//! issued by the deployment's host-service CA.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poem::http::StatusCode;
use poem::listener::{Listener, TcpListener};
use poem::web::{Data, Json};
use poem::{handler, EndpointExt, Request, Route};
use tokio::sync::watch;
use tracing::Instrument;

use crate::tls::{Authority, ServerIdentity};

/// What the simulated host service serves.
#[derive(Clone)]
pub enum HostTls {
    /// Plain HTTP (`HOST_SERVICE_SCHEME=http`).
    Plain,
    /// HTTPS with a self-signed certificate whose fingerprint it registers (`https`, no CA).
    SelfSigned,
    /// HTTPS with a certificate for its address issued by this CA (`HOST_SERVICE_CA_PEM`).
    IssuedBy(Arc<Authority>),
}

impl std::fmt::Debug for HostTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::Plain => "Plain",
            Self::SelfSigned => "SelfSigned",
            Self::IssuedBy(_) => "IssuedBy(..)",
        })
    }
}

impl HostTls {
    /// The identity a host at `ip` serves, if it speaks HTTPS.
    fn identity(&self, ip: Ipv4Addr) -> std::io::Result<Option<ServerIdentity>> {
        let made = match self {
            Self::Plain => return Ok(None),
            Self::SelfSigned => ServerIdentity::self_signed(ip.into()),
            Self::IssuedBy(authority) => authority.issue(&[&ip.to_string()]),
        };
        made.map(Some).map_err(std::io::Error::other)
    }
}

/// What a launched host learns from its user data, plus what it reports about itself.
#[derive(Clone)]
pub struct SimulatedHostSpec {
    pub instance_id: String,
    pub bootstrap_token: String,
    pub webserver_url: String,
    pub region: String,
    pub image_id: String,
    pub instance_type: String,
    pub client_commit_hash: String,
    pub mandelbox_capacity: u32,
    pub port: u16,
    pub tls: HostTls,
}

impl std::fmt::Debug for SimulatedHostSpec {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SimulatedHostSpec")
            .field("instance_id", &self.instance_id)
            .field("bootstrap_token", &"[redacted]")
            .field("webserver_url", &self.webserver_url)
            .field("region", &self.region)
            .field("image_id", &self.image_id)
            .field("instance_type", &self.instance_type)
            .field("client_commit_hash", &self.client_commit_hash)
            .field("mandelbox_capacity", &self.mandelbox_capacity)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A running simulated host.
pub struct SimulatedHost {
    pub ip: Ipv4Addr,
    shutdown: watch::Sender<bool>,
}

impl SimulatedHost {
    /// Stops the host (as if its machine were switched off).
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Turns `true` once the host has stopped (switched off, or shut down after draining).
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

impl Drop for SimulatedHost {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone)]
struct HostState {
    spec: SimulatedHostSpec,
    auth_token: Arc<Mutex<Option<String>>>,
    http: reqwest::Client,
    shutdown: watch::Sender<bool>,
    drain_requested: Arc<tokio::sync::Notify>,
}

impl HostState {
    fn authorised(&self, request: &Request) -> bool {
        let presented = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let known = self.auth_token.lock().ok().and_then(|token| token.clone());
        matches!((presented, known), (Some(presented), Some(known)) if presented == known)
    }
}

#[handler]
async fn spin_up(
    request: &Request,
    Data(state): Data<&HostState>,
    Json(body): Json<serde_json::Value>,
) -> poem::Result<Json<serde_json::Value>> {
    if !state.authorised(request) {
        return Err(poem::Error::from_status(StatusCode::UNAUTHORIZED));
    }
    let Some(mandelbox_id) = body["mandelbox_id"].as_str().map(str::to_string) else {
        return Err(poem::Error::from_status(StatusCode::BAD_REQUEST));
    };
    // Like a host service that traces: its work continues the webserver's trace, and so do its status reports.
    let span = tracing::info_span!("simulated host spin-up", mandelbox_id = %mandelbox_id);
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    crate::trace_context::continue_trace(
        &span,
        header(crate::trace_context::TRACEPARENT),
        header(crate::trace_context::TRACESTATE),
    );
    let state = state.clone();
    tokio::spawn(
        async move {
            for status in ["CONNECTING", "RUNNING"] {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let token = state.auth_token.lock().ok().and_then(|token| token.clone());
                let Some(token) = token else { return };
                let report = state
                    .http
                    .post(format!(
                        "{}/host/mandelbox/{mandelbox_id}/status",
                        state.spec.webserver_url
                    ))
                    .bearer_auth(token)
                    .json(&serde_json::json!({ "status": status }));
                let _ = crate::trace_context::inject(report).send().await;
            }
        }
        .instrument(span),
    );
    Ok(Json(serde_json::json!({})))
}

#[handler]
async fn drain_and_shutdown(
    request: &Request,
    Data(state): Data<&HostState>,
) -> poem::Result<Json<serde_json::Value>> {
    if !state.authorised(request) {
        return Err(poem::Error::from_status(StatusCode::UNAUTHORIZED));
    }
    // Like a real host service: take nothing new, keep heartbeating, and shut down once the webserver answers a
    // heartbeat with 410 (draining complete). A heartbeat goes at once, so an empty host shuts down now.
    state.drain_requested.notify_one();
    Ok(Json(serde_json::json!({})))
}

/// A loopback address for the host, picked from the instance id (127.0.0.1 is the webserver's own).
fn address_for(instance_id: &str, attempt: u32) -> Ipv4Addr {
    let mut hash: u32 = 2_166_136_261;
    for byte in instance_id.bytes().chain(attempt.to_le_bytes()) {
        hash = (hash ^ u32::from(byte)).wrapping_mul(16_777_619);
    }
    let [_, b, c, d] = hash.to_be_bytes();
    Ipv4Addr::new(127, b, c, d.clamp(2, 254))
}

/// Starts a simulated host: binds its address, registers, heartbeats.
///
/// # Errors
/// No loopback address could be bound, or no certificate could be made for it.
pub async fn start(spec: SimulatedHostSpec) -> std::io::Result<SimulatedHost> {
    crate::tls::ensure_crypto_provider();
    let mut bound = None;
    for attempt in 0..8 {
        let ip = address_for(&spec.instance_id, attempt);
        let identity = spec.tls.identity(ip)?;
        let listener = TcpListener::bind(format!("{ip}:{}", spec.port));
        let listener = match &identity {
            Some(identity) => listener.rustls(identity.listener_config()).boxed(),
            None => listener.boxed(),
        };
        if let Ok(acceptor) = listener.into_acceptor().await {
            bound = Some((ip, acceptor, identity));
            break;
        }
    }
    let Some((ip, acceptor, identity)) = bound else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no loopback address was free for a simulated host",
        ));
    };
    let (shutdown, receiver) = watch::channel(false);
    let state = HostState {
        spec: spec.clone(),
        auth_token: Arc::new(Mutex::new(None)),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default(),
        shutdown: shutdown.clone(),
        drain_requested: Arc::new(tokio::sync::Notify::new()),
    };
    let app = Route::new()
        .at("/spin_up_mandelbox", poem::put(spin_up))
        .at("/drain_and_shutdown", poem::post(drain_and_shutdown))
        .data(state.clone());
    let mut server_shutdown = receiver.clone();
    tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                app,
                async move {
                    let _ = server_shutdown.wait_for(|stop| *stop).await;
                },
                Some(Duration::from_secs(1)),
            )
            .await;
    });
    let fingerprint = identity.map(|identity| identity.sha256);
    tokio::spawn(live(state, ip, fingerprint, receiver));
    Ok(SimulatedHost { ip, shutdown })
}

/// The body of a healthy host's `POST /host/heartbeat` (the contract's fields, with a host's usual memory figures).
pub fn heartbeat_body(instance_id: &str, heartbeat_number: i64) -> serde_json::Value {
    serde_json::json!({
        "instance_id": instance_id,
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "heartbeat_number": heartbeat_number,
        "total_ram_kb": 32_000_000,
        "free_ram_kb": 24_000_000,
        "avail_ram_kb": 28_000_000,
        "is_dying": false,
    })
}

/// Registers (retrying until the webserver answers), then heartbeats until stopped or told it is gone.
async fn live(
    state: HostState,
    ip: Ipv4Addr,
    tls_cert_sha256: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let spec = &state.spec;
    let mut registration = serde_json::json!({
        "instance_id": spec.instance_id,
        "region": spec.region,
        "image_id": spec.image_id,
        "instance_type": spec.instance_type,
        "client_commit_hash": spec.client_commit_hash,
        "ip": ip.to_string(),
        "mandelbox_capacity": spec.mandelbox_capacity,
    });
    if let Some(fingerprint) = tls_cert_sha256 {
        registration["tls_cert_sha256"] = serde_json::Value::String(fingerprint);
    }
    let interval = loop {
        let response = state
            .http
            .post(format!("{}/host/register", spec.webserver_url))
            .bearer_auth(&spec.bootstrap_token)
            .json(&registration)
            .send()
            .await;
        match response {
            Ok(response) if response.status().is_success() => {
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                if let (Some(token), Ok(mut known)) =
                    (body["auth_token"].as_str(), state.auth_token.lock())
                {
                    *known = Some(token.to_string());
                }
                break body["heartbeat_interval_s"].as_u64().unwrap_or(60).max(1);
            }
            Ok(response) if response.status().is_client_error() => {
                tracing::warn!(
                    instance_id = spec.instance_id,
                    status = response.status().as_u16(),
                    "simulated host was refused registration; stopping"
                );
                let _ = state.shutdown.send(true);
                return;
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    };
    let mut number = 0i64;
    loop {
        number += 1;
        let token = state
            .auth_token
            .lock()
            .ok()
            .and_then(|token| token.clone())
            .unwrap_or_default();
        let response = state
            .http
            .post(format!("{}/host/heartbeat", spec.webserver_url))
            .bearer_auth(token)
            .json(&heartbeat_body(&spec.instance_id, number))
            .send()
            .await;
        if matches!(&response, Ok(response) if response.status() == StatusCode::GONE) {
            let _ = state.shutdown.send(true);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
            _ = state.drain_requested.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::address_for;

    #[test]
    fn a_simulated_host_never_takes_the_webservers_own_address() {
        for index in 0..1000 {
            let ip = address_for(&format!("instance-{index}"), 0);
            assert_eq!(ip.octets()[0], 127);
            assert!(ip.octets()[3] >= 2);
        }
    }
}
