//! The host service's endpoints (register, heartbeat, mandelbox status) and the protocol server's disconnect.

use chrono::Utc;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::types::Example;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use whist_adapters::store::CommandError;
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::instance::{
    DrainReason, InstanceCommand, InstanceError, InstanceStatus, LaunchSpec, RegistrationRules,
};
use whist_domain::mandelbox::ReportedStatus;
use whist_domain::{Actor, EventMetadata};

use crate::http::error::{error_body, unavailable, ErrorBody};
use crate::http::middleware::RequestId;
use crate::http::security::{BootstrapToken, HostToken, ProtocolSecret};
use crate::state::AppState;
use crate::workers::heartbeats::{now_ms, Heartbeat};

/// Seconds between heartbeats the webserver asks of hosts: 60, or a quarter of `HEARTBEAT_TIMEOUT_S` when that is
/// shorter, so that a live host is never judged silent.
pub fn heartbeat_interval_s(timeout: std::time::Duration) -> u32 {
    u32::try_from((timeout.as_secs() / 4).clamp(1, 60)).unwrap_or(60)
}

#[derive(Tags)]
enum HostTag {
    /// Called by the host service on every host.
    HostService,
    /// Called by the protocol server inside a mandelbox.
    ProtocolServer,
}

/// Body of `POST /host/register`.
#[derive(Debug, Object)]
#[oai(example)]
pub struct RegisterBody {
    pub instance_id: String,
    pub region: String,
    pub image_id: String,
    pub instance_type: String,
    pub client_commit_hash: String,
    pub ip: String,
    pub mandelbox_capacity: u32,
    /// Hex SHA-256 of the DER certificate the host service serves. Required with `HOST_SERVICE_SCHEME=https` and
    /// no `HOST_SERVICE_CA_PEM`; every later call to the host pins it.
    pub tls_cert_sha256: Option<String>,
}

#[derive(Object)]
pub struct RegisterAnswer {
    pub auth_token: String,
    pub heartbeat_interval_s: u32,
}

impl std::fmt::Debug for RegisterAnswer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegisterAnswer")
            .field("auth_token", &"[redacted]")
            .field("heartbeat_interval_s", &self.heartbeat_interval_s)
            .finish()
    }
}

impl Example for RegisterBody {
    fn example() -> Self {
        Self {
            instance_id: "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b".to_string(),
            region: "us-east-1".to_string(),
            image_id: "ami-0123456789abcdef0".to_string(),
            instance_type: "g4dn.2xlarge".to_string(),
            client_commit_hash: "9f3c2e1d0b8a7f6e5d4c3b2a1908f7e6d5c4b3a2".to_string(),
            ip: "10.0.3.17".to_string(),
            mandelbox_capacity: 8,
            tls_cert_sha256: Some(
                "3f0a6c1e9b2d4f8a7c5e3b1d9f7a5c3e1b9d7f5a3c1e9b7d5f3a1c9e7b5d3f1a".to_string(),
            ),
        }
    }
}

/// An empty JSON object.
#[derive(Debug, Object)]
pub struct Empty {}

#[derive(ApiResponse)]
pub enum RegisterResponse {
    #[oai(status = 200)]
    Registered(Json<RegisterAnswer>),
    /// Unknown or already used bootstrap token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The host's identity differs from its launch record (`IDENTITY_MISMATCH`), its address is not a bare IP
    /// address in the host networks (`HOST_ADDRESS_REFUSED`), or its capacity is outside 1 to
    /// `MAX_MANDELBOX_CAPACITY` (`CAPACITY_OUT_OF_RANGE`). The bootstrap token stays unused.
    #[oai(status = 409)]
    Mismatch(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// Body of `POST /host/heartbeat`.
#[derive(Debug, Object)]
#[oai(example)]
pub struct HeartbeatBody {
    pub instance_id: String,
    pub timestamp: String,
    pub heartbeat_number: i64,
    pub total_ram_kb: i64,
    pub free_ram_kb: i64,
    pub avail_ram_kb: i64,
    pub is_dying: bool,
}

impl Example for HeartbeatBody {
    fn example() -> Self {
        Self {
            instance_id: "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b".to_string(),
            timestamp: "2026-12-05T10:15:00Z".to_string(),
            heartbeat_number: 42,
            total_ram_kb: 32_768_000,
            free_ram_kb: 20_480_000,
            avail_ram_kb: 24_576_000,
            is_dying: false,
        }
    }
}

#[derive(ApiResponse)]
pub enum HeartbeatResponse {
    #[oai(status = 200)]
    Ok(Json<Empty>),
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// The host is done (drained or terminated): it shuts down.
    #[oai(status = 410)]
    Gone(Json<ErrorBody>),
}

/// A status the host reports for a mandelbox.
#[derive(Debug, Clone, Copy, Enum)]
#[oai(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReportedStatusBody {
    Connecting,
    Running,
    Dying,
}

/// Body of `POST /host/mandelbox/{mandelbox_id}/status`.
#[derive(Debug, Object)]
#[oai(example)]
pub struct StatusBody {
    pub status: ReportedStatusBody,
}

impl Example for StatusBody {
    fn example() -> Self {
        Self {
            status: ReportedStatusBody::Running,
        }
    }
}

#[derive(ApiResponse)]
pub enum PeerResponse {
    #[oai(status = 200)]
    Ok(Json<Empty>),
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// Whether a path id can name a mandelbox (mandelbox ids are UUIDs): anything else is answered 404 without a read.
pub fn is_uuid(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok()
}

/// The host service's and protocol server's API.
pub struct HostApi;

#[OpenApi]
impl HostApi {
    /// Register a host with its one-time bootstrap token.
    ///
    /// The host proves it is the launch it claims, is given its `auth_token`, and becomes ACTIVE.
    #[oai(
        path = "/host/register",
        method = "post",
        tag = "HostTag::HostService",
        operation_id = "registerHost"
    )]
    async fn register(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        token: BootstrapToken,
        body: Json<RegisterBody>,
    ) -> RegisterResponse {
        let body = body.0;
        let services = &state.services;
        let presented = token.0.token;
        if !services
            .tokens
            .verify(Purpose::Bootstrap, &body.instance_id, &presented)
        {
            return RegisterResponse::Unauthorized(error_body("UNKNOWN_TOKEN"));
        }
        let auth_token = services.tokens.derive(Purpose::HostAuth, &body.instance_id);
        let metadata = EventMetadata::for_request(
            Actor::Host(body.instance_id.clone()),
            &request_id.0 .0,
            Utc::now(),
        );
        let command = InstanceCommand::Register {
            identity: LaunchSpec {
                region: body.region,
                image_id: body.image_id,
                client_commit_hash: body.client_commit_hash,
                instance_type: body.instance_type,
            },
            presented_token_hash: fingerprint(&presented),
            auth_token_hash: fingerprint(&auth_token),
            ip: body.ip,
            mandelbox_capacity: body.mandelbox_capacity,
            tls_cert_sha256: body.tls_cert_sha256,
            rules: RegistrationRules {
                host_networks: state.settings.host_network_cidrs.clone(),
                max_capacity: state.settings.max_mandelbox_capacity,
                require_tls_pin: state.settings.host_tls_pin_required(),
            },
            at: Utc::now(),
        };
        match services
            .instances
            .execute_retrying(&body.instance_id, command, &metadata)
            .await
        {
            Ok(()) => RegisterResponse::Registered(Json(RegisterAnswer {
                auth_token,
                heartbeat_interval_s: heartbeat_interval_s(state.settings.heartbeat_timeout),
            })),
            Err(CommandError::Rejected(
                InstanceError::Unknown
                | InstanceError::WrongBootstrapToken
                | InstanceError::AlreadyRegistered,
            )) => RegisterResponse::Unauthorized(error_body("UNKNOWN_OR_USED_TOKEN")),
            Err(CommandError::Rejected(InstanceError::AddressRefused)) => {
                tracing::warn!(
                    instance_id = body.instance_id,
                    "host registration refused: address"
                );
                RegisterResponse::Mismatch(error_body("HOST_ADDRESS_REFUSED"))
            }
            Err(CommandError::Rejected(InstanceError::TlsPinRefused)) => {
                tracing::warn!(
                    instance_id = body.instance_id,
                    "host registration refused: certificate fingerprint missing or malformed"
                );
                RegisterResponse::Mismatch(error_body("TLS_CERT_SHA256_REFUSED"))
            }
            Err(CommandError::Rejected(InstanceError::CapacityOutOfRange)) => {
                tracing::warn!(
                    instance_id = body.instance_id,
                    "host registration refused: capacity"
                );
                RegisterResponse::Mismatch(error_body("CAPACITY_OUT_OF_RANGE"))
            }
            Err(CommandError::Rejected(_)) => {
                RegisterResponse::Mismatch(error_body("IDENTITY_MISMATCH"))
            }
            Err(error) => {
                RegisterResponse::Unavailable(unavailable("could not register a host", &error))
            }
        }
    }

    /// Say that a host is alive.
    ///
    /// Not an event: only changes of liveness become events.
    #[oai(
        path = "/host/heartbeat",
        method = "post",
        tag = "HostTag::HostService",
        operation_id = "sendHeartbeat"
    )]
    async fn heartbeat(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        token: HostToken,
        body: Json<HeartbeatBody>,
    ) -> HeartbeatResponse {
        let body = body.0;
        let services = &state.services;
        if !services
            .tokens
            .verify(Purpose::HostAuth, &body.instance_id, &token.0.token)
        {
            return HeartbeatResponse::Unauthorized(error_body("UNAUTHORIZED"));
        }
        let known = services.heartbeats.status_of(&body.instance_id).await;
        if let Some((status, live)) = known {
            let drained = status == InstanceStatus::Draining && live == 0;
            if status.is_ending() || drained {
                return HeartbeatResponse::Gone(error_body("HOST_DONE"));
            }
        }
        services.heartbeats.record(Heartbeat {
            instance_id: body.instance_id.clone(),
            received_at_ms: now_ms(),
            heartbeat_number: body.heartbeat_number,
            total_ram_kb: body.total_ram_kb,
            free_ram_kb: body.free_ram_kb,
            avail_ram_kb: body.avail_ram_kb,
            is_dying: body.is_dying,
        });
        // Changes of liveness are events; the cache spares a command per heartbeat.
        let change = match known {
            Some((InstanceStatus::Unresponsive, _)) => {
                Some(InstanceCommand::MarkResponsive { at: Utc::now() })
            }
            Some((InstanceStatus::Active, _)) if body.is_dying => Some(InstanceCommand::Drain {
                reason: DrainReason::HostDying,
                at: Utc::now(),
            }),
            _ => None,
        };
        // While the database is known to be down the change waits: the copy still shows the old status, so the
        // host's next heartbeat brings it up again.
        if let Some(command) = change.filter(|_| !state.database.reachability().is_down()) {
            let metadata = EventMetadata::for_request(
                Actor::Host(body.instance_id.clone()),
                &request_id.0 .0,
                Utc::now(),
            );
            if let Err(error) = services
                .instances
                .execute_retrying(&body.instance_id, command, &metadata)
                .await
            {
                tracing::warn!(instance_id = body.instance_id, error = %error, "liveness change not recorded");
            }
        }
        HeartbeatResponse::Ok(Json(Empty {}))
    }

    /// Report a mandelbox's status from its host.
    #[oai(
        path = "/host/mandelbox/:mandelbox_id/status",
        method = "post",
        tag = "HostTag::HostService",
        operation_id = "reportMandelboxStatus"
    )]
    async fn mandelbox_status(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        token: HostToken,
        mandelbox_id: Path<String>,
        body: Json<StatusBody>,
    ) -> PeerResponse {
        let services = &state.services;
        // The token names its host and is checked by HMAC alone: a forged one costs no read of the store.
        let Some(reporting_host) = services
            .tokens
            .subject(Purpose::HostAuth, &token.0.token)
            .map(str::to_string)
        else {
            return PeerResponse::Unauthorized(error_body("UNAUTHORIZED"));
        };
        let placement = match placed_mandelbox(&state, &mandelbox_id.0).await {
            Ok(placement) => placement,
            Err(response) => return response,
        };
        if placement.instance_id != reporting_host {
            // Another host's token: as good as none for this mandelbox.
            return PeerResponse::Unauthorized(error_body("UNAUTHORIZED"));
        }
        let status = match body.0.status {
            ReportedStatusBody::Connecting => ReportedStatus::Connecting,
            ReportedStatusBody::Running => ReportedStatus::Running,
            ReportedStatusBody::Dying => ReportedStatus::Dying,
        };
        let metadata = EventMetadata::for_request(
            Actor::Host(placement.instance_id.clone()),
            &request_id.0 .0,
            Utc::now(),
        );
        match crate::control::mandelboxes::record_status(
            &state,
            &mandelbox_id.0,
            &placement,
            status,
            &metadata,
        )
        .await
        {
            Ok(()) => PeerResponse::Ok(Json(Empty {})),
            Err(error) => PeerResponse::Unavailable(unavailable(
                "could not record a mandelbox status",
                &error,
            )),
        }
    }

    /// Say that the user disconnected from a mandelbox.
    ///
    /// Called by the protocol server: the mandelbox ends and its slot frees. Idempotent.
    #[oai(
        path = "/mandelbox/:mandelbox_id/disconnect",
        method = "post",
        tag = "HostTag::ProtocolServer",
        operation_id = "disconnectMandelbox"
    )]
    async fn disconnect(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        token: ProtocolSecret,
        mandelbox_id: Path<String>,
    ) -> PeerResponse {
        let services = &state.services;
        // The secret is derived from the mandelbox id: checked before anything is read.
        if !services
            .tokens
            .verify(Purpose::Protocol, &mandelbox_id.0, &token.0.token)
        {
            return PeerResponse::Unauthorized(error_body("UNAUTHORIZED"));
        }
        let placement = match placed_mandelbox(&state, &mandelbox_id.0).await {
            Ok(placement) => placement,
            Err(response) => return response,
        };
        let metadata = EventMetadata::for_request(
            Actor::User(placement.user_id.clone()),
            &request_id.0 .0,
            Utc::now(),
        );
        match crate::control::mandelboxes::end_mandelbox(
            &state,
            &mandelbox_id.0,
            &placement,
            &metadata,
        )
        .await
        {
            Ok(()) => PeerResponse::Ok(Json(Empty {})),
            Err(error) => {
                PeerResponse::Unavailable(unavailable("could not end a mandelbox", &error))
            }
        }
    }
}

/// Where a mandelbox was placed; 404 for an unknown one (a malformed id without a read), 503 when the store fails.
async fn placed_mandelbox(
    state: &AppState,
    mandelbox_id: &str,
) -> Result<whist_domain::mandelbox::Placement, PeerResponse> {
    if !is_uuid(mandelbox_id) {
        return Err(PeerResponse::NotFound(error_body("NOT_FOUND")));
    }
    match crate::control::mandelboxes::placement(state, mandelbox_id).await {
        Ok(Some(placement)) => Ok(placement),
        Ok(None) => Err(PeerResponse::NotFound(error_body("NOT_FOUND"))),
        Err(error) => Err(PeerResponse::Unavailable(unavailable(
            "could not load a mandelbox",
            &error,
        ))),
    }
}
