//! The instance aggregate: one EC2 host (or simulated host) and the mandelbox slots it holds.
//!
//! Life: `PRE_CONNECTION` (launch decided, waiting for the host to register) → `ACTIVE` (registered, takes
//! mandelboxes) → `DRAINING` (takes no new mandelbox, ends when empty) → `TERMINATING` → `TERMINATED`, with
//! `UNRESPONSIVE` for a host whose heartbeats stopped. Slots are allocated here, under the aggregate's optimistic
//! concurrency, so two allocations can never take the same slot and a host never holds more than its capacity.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a host is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InstanceStatus {
    PreConnection,
    Active,
    Draining,
    Unresponsive,
    Terminating,
    Terminated,
}

impl InstanceStatus {
    /// The contract's spelling (`PRE_CONNECTION`, `ACTIVE`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreConnection => "PRE_CONNECTION",
            Self::Active => "ACTIVE",
            Self::Draining => "DRAINING",
            Self::Unresponsive => "UNRESPONSIVE",
            Self::Terminating => "TERMINATING",
            Self::Terminated => "TERMINATED",
        }
    }

    /// Reads the contract's spelling back.
    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::PreConnection,
            Self::Active,
            Self::Draining,
            Self::Unresponsive,
            Self::Terminating,
            Self::Terminated,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }

    /// Whether the host is gone or going (its heartbeats are answered 410).
    pub fn is_ending(self) -> bool {
        matches!(self, Self::Terminating | Self::Terminated)
    }
}

/// What a launch decided: the identity the host must present when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub region: String,
    pub image_id: String,
    pub client_commit_hash: String,
    pub instance_type: String,
}

/// The host as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub status: Option<InstanceStatus>,
    pub spec: Option<LaunchSpec>,
    pub bootstrap_token_hash: Option<String>,
    pub auth_token_hash: Option<String>,
    pub cloud_instance_id: Option<String>,
    pub ip: Option<String>,
    pub capacity: u32,
    pub mandelboxes: BTreeSet<String>,
    pub launch_requested_at: Option<DateTime<Utc>>,
    /// The status to return to when an unresponsive host is heard from again.
    pub status_before_silence: Option<InstanceStatus>,
    /// Cloud instances carrying this launch's tag that were not (or no longer) its host, and were terminated.
    #[serde(default)]
    pub strays_terminated: BTreeSet<String>,
    /// Why the termination was decided, once it was.
    #[serde(default)]
    pub termination_reason: Option<TerminationReason>,
    /// Hex SHA-256 of the DER certificate the host service serves, as it registered it: every call to the host
    /// over HTTPS pins it (unless the deployment names a CA for host services).
    #[serde(default)]
    pub tls_cert_sha256: Option<String>,
}

/// Commands the instance takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceCommand {
    /// Decide to launch a host with this identity; the host proves it is this launch with the bootstrap token.
    RequestLaunch {
        spec: LaunchSpec,
        bootstrap_token_hash: String,
        reason: LaunchReason,
        at: DateTime<Utc>,
    },
    /// The cloud started the host.
    RecordLaunch {
        cloud_instance_id: String,
        at: DateTime<Utc>,
    },
    /// The cloud refused to start the host.
    RecordLaunchFailure { reason: String, at: DateTime<Utc> },
    /// The host service called `/host/register`.
    Register {
        identity: LaunchSpec,
        presented_token_hash: String,
        auth_token_hash: String,
        /// What the host claims; checked against `rules` before anything is recorded.
        ip: String,
        mandelbox_capacity: u32,
        /// Hex SHA-256 of the DER certificate the host service serves, if it declared one.
        tls_cert_sha256: Option<String>,
        /// The deployment's rules for what a host may declare (`HOST_NETWORK_CIDRS`, `MAX_MANDELBOX_CAPACITY`,
        /// whether a certificate fingerprint is required).
        rules: RegistrationRules,
        at: DateTime<Utc>,
    },
    /// Reserve one slot for a mandelbox.
    AllocateMandelbox {
        mandelbox_id: String,
        user_id: String,
        at: DateTime<Utc>,
    },
    /// The mandelbox ended; its slot is free. Idempotent.
    FreeMandelbox {
        mandelbox_id: String,
        at: DateTime<Utc>,
    },
    /// Take no new mandelbox; end once empty. Idempotent.
    Drain {
        reason: DrainReason,
        at: DateTime<Utc>,
    },
    /// Heartbeats stopped for longer than the timeout.
    MarkUnresponsive { at: DateTime<Utc> },
    /// A heartbeat arrived from a host marked unresponsive.
    MarkResponsive { at: DateTime<Utc> },
    /// Start ending the host (through its host service, or the cloud when it is unresponsive). Idempotent.
    Terminate {
        reason: TerminationReason,
        at: DateTime<Utc>,
    },
    /// The cloud reports the host gone. Idempotent.
    RecordTerminated { at: DateTime<Utc> },
    /// The cloud holds an instance tagged with this launch that is not its live host (a second instance of the
    /// launch, or one outliving its record, or one whose decision was never recorded): end it. Taken in any state,
    /// even by an id with no launch decision. Idempotent per cloud instance.
    TerminateStray {
        region: String,
        cloud_instance_id: String,
        at: DateTime<Utc>,
    },
}

/// Why a host drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    ScaleDown,
    ImageRetired,
    HostDying,
    Operator,
}

/// Why a host was launched (recorded from version 2.0 of `InstanceLaunchRequested` on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchReason {
    /// The autoscaler, for the region's warm buffer.
    WarmBuffer,
    /// A release's buffer of hosts on its candidate image.
    ReleaseBuffer,
    /// A developer asked for it.
    Operator,
    /// Decided before launches recorded their reason (an upcast version 1.0 event).
    Unrecorded,
}

/// Why a host is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    Drained,
    Unresponsive,
    NeverRegistered,
    /// A host still booting on an image a release retired or abandoned (a registered one is drained instead).
    ImageRetired,
    Orphaned,
    Operator,
    LaunchFailed,
}

/// Events of the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceEvent {
    /// Version 2.0 (version 1.0 had no `reason`; see `crate::versions`).
    LaunchRequested {
        spec: LaunchSpec,
        bootstrap_token_hash: String,
        reason: LaunchReason,
        at: DateTime<Utc>,
    },
    Launched {
        cloud_instance_id: String,
        at: DateTime<Utc>,
    },
    LaunchFailed {
        reason: String,
        at: DateTime<Utc>,
    },
    Registered {
        ip: String,
        mandelbox_capacity: u32,
        auth_token_hash: String,
        /// The host service's certificate fingerprint (lowercase hex SHA-256 of its DER), when it declared one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_cert_sha256: Option<String>,
        at: DateTime<Utc>,
    },
    MandelboxAllocated {
        mandelbox_id: String,
        user_id: String,
        live_after: u32,
        at: DateTime<Utc>,
    },
    MandelboxFreed {
        mandelbox_id: String,
        live_after: u32,
        at: DateTime<Utc>,
    },
    DrainStarted {
        reason: DrainReason,
        at: DateTime<Utc>,
    },
    BecameUnresponsive {
        at: DateTime<Utc>,
    },
    BecameResponsive {
        /// The status the host returns to (the one it had when it went silent).
        returned_to: InstanceStatus,
        at: DateTime<Utc>,
    },
    TerminationStarted {
        reason: TerminationReason,
        at: DateTime<Utc>,
    },
    Terminated {
        at: DateTime<Utc>,
    },
    StrayTerminated {
        region: String,
        cloud_instance_id: String,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(
    InstanceEvent,
    "Instance",
    [
        LaunchRequested = crate::versions::LAUNCH_REQUESTED_VERSION,
        Launched,
        LaunchFailed,
        Registered,
        MandelboxAllocated,
        MandelboxFreed,
        DrainStarted,
        BecameUnresponsive,
        BecameResponsive,
        TerminationStarted,
        Terminated,
        StrayTerminated
    ]
);

/// What a registering host may declare: the webserver later sends requests to its address and places mandelboxes
/// by its capacity, so a host that lies about either could make the webserver call the cloud's metadata service or
/// draw every assign of its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationRules {
    /// The networks a host's address must fall in.
    pub host_networks: Vec<ipnet::IpNet>,
    /// The most mandelboxes one host may declare.
    pub max_capacity: u32,
    /// Whether a host must declare its certificate's fingerprint (`HOST_SERVICE_SCHEME=https` without
    /// `HOST_SERVICE_CA_PEM`: the fingerprint is then all that authenticates the host service on later calls).
    pub require_tls_pin: bool,
}

impl RegistrationRules {
    /// The address a host declared, if the rules allow it: a bare IP address (no port, no path, no zone), never
    /// link-local (the cloud metadata service is 169.254.169.254), multicast, broadcast or unspecified, inside one
    /// of `host_networks`. An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is judged as the IPv4 address.
    ///
    /// # Errors
    /// [`InstanceError::AddressRefused`] for anything else.
    pub fn host_address(&self, ip: &str) -> Result<std::net::IpAddr, InstanceError> {
        let address = ip
            .parse::<std::net::IpAddr>()
            .map_err(|_| InstanceError::AddressRefused)?
            .to_canonical();
        let special = address.is_unspecified()
            || address.is_multicast()
            || match address {
                std::net::IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
                std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
        if special
            || !self
                .host_networks
                .iter()
                .any(|network| network.contains(&address))
        {
            return Err(InstanceError::AddressRefused);
        }
        Ok(address)
    }

    /// Whether a host may declare `capacity` slots: 1 to `max_capacity`.
    ///
    /// # Errors
    /// [`InstanceError::CapacityOutOfRange`] otherwise.
    pub fn capacity(&self, capacity: u32) -> Result<u32, InstanceError> {
        if (1..=self.max_capacity).contains(&capacity) {
            Ok(capacity)
        } else {
            Err(InstanceError::CapacityOutOfRange)
        }
    }

    /// The certificate fingerprint a host declared, normalised to lowercase hex: 64 hex digits (a SHA-256), and
    /// present when the rules require one.
    ///
    /// # Errors
    /// [`InstanceError::TlsPinRefused`] for a malformed fingerprint or a missing required one.
    pub fn tls_pin(&self, declared: Option<&str>) -> Result<Option<String>, InstanceError> {
        match declared {
            Some(pin) if pin.len() == 64 && pin.bytes().all(|byte| byte.is_ascii_hexdigit()) => {
                Ok(Some(pin.to_ascii_lowercase()))
            }
            Some(_) => Err(InstanceError::TlsPinRefused),
            None if self.require_tls_pin => Err(InstanceError::TlsPinRefused),
            None => Ok(None),
        }
    }
}

/// Why the instance refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    #[error("the host's address is not a bare IP address in the host networks")]
    AddressRefused,
    #[error("the host's declared capacity is outside 1 to the deployment's maximum")]
    CapacityOutOfRange,
    #[error("the host's certificate fingerprint is missing (and required) or not a hex SHA-256")]
    TlsPinRefused,
    #[error("the instance already exists")]
    AlreadyExists,
    #[error("no such instance")]
    Unknown,
    #[error("the bootstrap token does not belong to this launch")]
    WrongBootstrapToken,
    #[error("the host has already registered")]
    AlreadyRegistered,
    #[error("the host's identity differs from its launch record")]
    IdentityMismatch,
    #[error("the host is not taking new mandelboxes")]
    NotAcceptingMandelboxes,
    #[error("the host has no free slot")]
    AtCapacity,
    #[error("the launch already recorded a different cloud instance")]
    CloudInstanceMismatch,
    #[error("the host is not in a state that allows this")]
    InvalidTransition,
    #[error("the host holds mandelboxes")]
    NotEmpty,
    #[error("the cloud instance is this launch's live host (or the one it awaits), not a stray")]
    NotAStray,
}

impl Instance {
    /// Live mandelboxes on the host.
    pub fn live(&self) -> u32 {
        u32::try_from(self.mandelboxes.len()).unwrap_or(u32::MAX)
    }

    /// Free slots (0 unless the host takes mandelboxes).
    pub fn free_slots(&self) -> u32 {
        match self.status {
            Some(InstanceStatus::Active) => self.capacity.saturating_sub(self.live()),
            _ => 0,
        }
    }

    fn status(&self) -> Result<InstanceStatus, InstanceError> {
        self.status.ok_or(InstanceError::Unknown)
    }
}

impl crate::decide::Decide for Instance {
    type Command = InstanceCommand;
    type Event = InstanceEvent;
    type Error = InstanceError;

    fn decide(&self, command: InstanceCommand) -> Result<Vec<InstanceEvent>, InstanceError> {
        use InstanceCommand as C;
        use InstanceEvent as E;
        use InstanceStatus as S;
        match command {
            C::RequestLaunch {
                spec,
                bootstrap_token_hash,
                reason,
                at,
            } => match self.status {
                Some(_) => Err(InstanceError::AlreadyExists),
                None => Ok(vec![E::LaunchRequested {
                    spec,
                    bootstrap_token_hash,
                    reason,
                    at,
                }]),
            },
            C::RecordLaunch {
                cloud_instance_id,
                at,
            } => {
                let status = self.status()?;
                match &self.cloud_instance_id {
                    Some(known) if *known == cloud_instance_id => Ok(vec![]),
                    Some(_) => Err(InstanceError::CloudInstanceMismatch),
                    None if status == S::Terminated => Err(InstanceError::InvalidTransition),
                    None => Ok(vec![E::Launched {
                        cloud_instance_id,
                        at,
                    }]),
                }
            }
            C::RecordLaunchFailure { reason, at } => match self.status()? {
                S::PreConnection if self.cloud_instance_id.is_none() => {
                    Ok(vec![E::LaunchFailed { reason, at }])
                }
                S::Terminated => Ok(vec![]),
                _ => Err(InstanceError::InvalidTransition),
            },
            C::Register {
                identity,
                presented_token_hash,
                auth_token_hash,
                ip,
                mandelbox_capacity,
                tls_cert_sha256,
                rules,
                at,
            } => {
                self.status()?;
                if self.bootstrap_token_hash.as_deref() != Some(presented_token_hash.as_str()) {
                    return Err(InstanceError::WrongBootstrapToken);
                }
                if self.status != Some(S::PreConnection) {
                    return Err(InstanceError::AlreadyRegistered);
                }
                if self.spec.as_ref() != Some(&identity) {
                    return Err(InstanceError::IdentityMismatch);
                }
                let address = rules.host_address(&ip)?;
                let mandelbox_capacity = rules.capacity(mandelbox_capacity)?;
                let tls_cert_sha256 = rules.tls_pin(tls_cert_sha256.as_deref())?;
                Ok(vec![E::Registered {
                    ip: address.to_string(),
                    mandelbox_capacity,
                    auth_token_hash,
                    tls_cert_sha256,
                    at,
                }])
            }
            C::AllocateMandelbox {
                mandelbox_id,
                user_id,
                at,
            } => {
                if self.status()? != S::Active {
                    return Err(InstanceError::NotAcceptingMandelboxes);
                }
                if self.mandelboxes.contains(&mandelbox_id) {
                    return Ok(vec![]);
                }
                if self.live() >= self.capacity {
                    return Err(InstanceError::AtCapacity);
                }
                Ok(vec![E::MandelboxAllocated {
                    mandelbox_id,
                    user_id,
                    live_after: self.live() + 1,
                    at,
                }])
            }
            C::FreeMandelbox { mandelbox_id, at } => {
                self.status()?;
                if !self.mandelboxes.contains(&mandelbox_id) {
                    return Ok(vec![]);
                }
                Ok(vec![E::MandelboxFreed {
                    mandelbox_id,
                    live_after: self.live().saturating_sub(1),
                    at,
                }])
            }
            C::Drain { reason, at } => match self.status()? {
                // Scaling down takes only an empty host: a mandelbox placed since the decision was read keeps it.
                S::PreConnection | S::Active | S::Unresponsive
                    if reason == DrainReason::ScaleDown && !self.mandelboxes.is_empty() =>
                {
                    Err(InstanceError::NotEmpty)
                }
                S::PreConnection | S::Active | S::Unresponsive => {
                    Ok(vec![E::DrainStarted { reason, at }])
                }
                S::Draining | S::Terminating | S::Terminated => Ok(vec![]),
            },
            C::MarkUnresponsive { at } => match self.status()? {
                S::Active | S::Draining => Ok(vec![E::BecameUnresponsive { at }]),
                S::Unresponsive | S::Terminating | S::Terminated => Ok(vec![]),
                S::PreConnection => Err(InstanceError::InvalidTransition),
            },
            C::MarkResponsive { at } => match self.status()? {
                S::Unresponsive => Ok(vec![E::BecameResponsive {
                    returned_to: self.status_before_silence.unwrap_or(S::Active),
                    at,
                }]),
                _ => Ok(vec![]),
            },
            C::Terminate { reason, at } => match self.status()? {
                S::Terminating | S::Terminated => Ok(vec![]),
                // Only silence justifies ending a host through the cloud without asking it first.
                status
                    if reason == TerminationReason::Unresponsive && status != S::Unresponsive =>
                {
                    Err(InstanceError::InvalidTransition)
                }
                // Only a host that never registered can be ended for not registering, or ended outright for its
                // image's retirement (a registered one drains, so its mandelboxes end first).
                status
                    if matches!(
                        reason,
                        TerminationReason::NeverRegistered | TerminationReason::ImageRetired
                    ) && status != S::PreConnection =>
                {
                    Err(InstanceError::InvalidTransition)
                }
                _ => Ok(vec![E::TerminationStarted { reason, at }]),
            },
            C::RecordTerminated { at } => match self.status()? {
                S::Terminated => Ok(vec![]),
                _ => Ok(vec![E::Terminated { at }]),
            },
            C::TerminateStray {
                region,
                cloud_instance_id,
                at,
            } => {
                let ended = matches!(self.status, Some(S::Terminating | S::Terminated) | None);
                let its_host =
                    self.cloud_instance_id.as_deref() == Some(cloud_instance_id.as_str());
                // A launch whose instance is not recorded yet adopts the one it finds rather than ending it, even
                // when its host registered first (the launch call's answer was lost, the machine booted anyway).
                let awaited = self.cloud_instance_id.is_none();
                if (its_host || awaited) && !ended {
                    return Err(InstanceError::NotAStray);
                }
                if self.strays_terminated.contains(&cloud_instance_id) {
                    return Ok(vec![]);
                }
                Ok(vec![E::StrayTerminated {
                    region,
                    cloud_instance_id,
                    at,
                }])
            }
        }
    }

    fn evolve(&mut self, event: InstanceEvent) {
        use InstanceEvent as E;
        use InstanceStatus as S;
        match event {
            E::LaunchRequested {
                spec,
                bootstrap_token_hash,
                at,
                ..
            } => {
                self.status = Some(S::PreConnection);
                self.spec = Some(spec);
                self.bootstrap_token_hash = Some(bootstrap_token_hash);
                self.launch_requested_at = Some(at);
            }
            E::Launched {
                cloud_instance_id, ..
            } => self.cloud_instance_id = Some(cloud_instance_id),
            E::LaunchFailed { .. } => self.status = Some(S::Terminated),
            E::Registered {
                ip,
                mandelbox_capacity,
                auth_token_hash,
                tls_cert_sha256,
                ..
            } => {
                self.status = Some(S::Active);
                self.ip = Some(ip);
                self.capacity = mandelbox_capacity;
                self.auth_token_hash = Some(auth_token_hash);
                self.tls_cert_sha256 = tls_cert_sha256;
            }
            E::MandelboxAllocated { mandelbox_id, .. } => {
                self.mandelboxes.insert(mandelbox_id);
            }
            E::MandelboxFreed { mandelbox_id, .. } => {
                self.mandelboxes.remove(&mandelbox_id);
            }
            E::DrainStarted { .. } => self.status = Some(S::Draining),
            E::BecameUnresponsive { .. } => {
                self.status_before_silence = self.status;
                self.status = Some(S::Unresponsive);
            }
            E::BecameResponsive { returned_to, .. } => {
                self.status_before_silence = None;
                self.status = Some(returned_to);
            }
            E::TerminationStarted { reason, .. } => {
                self.status = Some(S::Terminating);
                self.termination_reason = Some(reason);
            }
            E::Terminated { .. } => self.status = Some(S::Terminated),
            E::StrayTerminated {
                cloud_instance_id, ..
            } => {
                self.strays_terminated.insert(cloud_instance_id);
            }
        }
    }
}

crate::cqrs_aggregate!(Instance, "instance");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Decide as _;
    use cqrs_es::test::TestFramework;
    use cqrs_es::Aggregate as _;
    use proptest::prelude::*;

    type InstanceTest = TestFramework<Instance>;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            region: "us-east-1".to_string(),
            image_id: "ami-1".to_string(),
            client_commit_hash: "abc".to_string(),
            instance_type: "g4dn.2xlarge".to_string(),
        }
    }

    fn launched() -> Vec<InstanceEvent> {
        vec![InstanceEvent::LaunchRequested {
            spec: spec(),
            bootstrap_token_hash: "boot".to_string(),
            reason: LaunchReason::WarmBuffer,
            at: at(),
        }]
    }

    fn active(capacity: u32) -> Vec<InstanceEvent> {
        let mut events = launched();
        events.push(InstanceEvent::Registered {
            ip: "10.0.0.1".to_string(),
            mandelbox_capacity: capacity,
            auth_token_hash: "auth".to_string(),
            tls_cert_sha256: None,
            at: at(),
        });
        events
    }

    fn allocated(events: &mut Vec<InstanceEvent>, mandelbox_id: &str, live_after: u32) {
        events.push(InstanceEvent::MandelboxAllocated {
            mandelbox_id: mandelbox_id.to_string(),
            user_id: "u".to_string(),
            live_after,
            at: at(),
        });
    }

    fn register(token: &str, identity: LaunchSpec) -> InstanceCommand {
        InstanceCommand::Register {
            identity,
            presented_token_hash: token.to_string(),
            auth_token_hash: "auth".to_string(),
            ip: "10.0.0.1".to_string(),
            mandelbox_capacity: 2,
            tls_cert_sha256: None,
            rules: rules(),
            at: at(),
        }
    }

    fn rules() -> RegistrationRules {
        RegistrationRules {
            host_networks: vec!["10.0.0.0/8".parse().expect("a CIDR")],
            max_capacity: 64,
            require_tls_pin: false,
        }
    }

    fn register_at(ip: &str, capacity: u32) -> InstanceCommand {
        InstanceCommand::Register {
            identity: spec(),
            presented_token_hash: "boot".to_string(),
            auth_token_hash: "auth".to_string(),
            ip: ip.to_string(),
            mandelbox_capacity: capacity,
            tls_cert_sha256: None,
            rules: rules(),
            at: at(),
        }
    }

    #[test]
    fn a_host_that_claims_the_metadata_service_or_an_address_with_a_port_or_path_is_refused() {
        for ip in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "10.0.0.1:4678",
            "10.0.0.1/latest",
            "http://10.0.0.1",
            "fe80::1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "",
        ] {
            InstanceTest::with(())
                .given(launched())
                .when(register_at(ip, 2))
                .then_expect_error(InstanceError::AddressRefused);
        }
    }

    #[test]
    fn a_host_outside_the_host_networks_is_refused() {
        for ip in ["127.0.0.1", "192.168.1.10", "8.8.8.8", "::1"] {
            InstanceTest::with(())
                .given(launched())
                .when(register_at(ip, 2))
                .then_expect_error(InstanceError::AddressRefused);
        }
    }

    #[test]
    fn a_host_may_declare_one_to_the_maximum_capacity_only() {
        for capacity in [0, 65, 1_000_000] {
            InstanceTest::with(())
                .given(launched())
                .when(register_at("10.0.0.1", capacity))
                .then_expect_error(InstanceError::CapacityOutOfRange);
        }
        InstanceTest::with(())
            .given(launched())
            .when(register_at("10.1.2.3", 64))
            .then_expect_events(vec![InstanceEvent::Registered {
                ip: "10.1.2.3".to_string(),
                mandelbox_capacity: 64,
                auth_token_hash: "auth".to_string(),
                tls_cert_sha256: None,
                at: at(),
            }]);
    }

    #[test]
    fn an_ipv4_address_written_as_ipv6_is_recorded_as_ipv4() {
        InstanceTest::with(())
            .given(launched())
            .when(register_at("::ffff:10.0.0.7", 2))
            .then_expect_events(vec![InstanceEvent::Registered {
                ip: "10.0.0.7".to_string(),
                mandelbox_capacity: 2,
                auth_token_hash: "auth".to_string(),
                tls_cert_sha256: None,
                at: at(),
            }]);
    }

    fn register_pinned(pin: Option<&str>, require_tls_pin: bool) -> InstanceCommand {
        InstanceCommand::Register {
            identity: spec(),
            presented_token_hash: "boot".to_string(),
            auth_token_hash: "auth".to_string(),
            ip: "10.0.0.1".to_string(),
            mandelbox_capacity: 2,
            tls_cert_sha256: pin.map(str::to_string),
            rules: RegistrationRules {
                require_tls_pin,
                ..rules()
            },
            at: at(),
        }
    }

    #[test]
    fn a_host_registers_its_certificate_fingerprint_in_lowercase() {
        let pin = "AB".repeat(32);
        InstanceTest::with(())
            .given(launched())
            .when(register_pinned(Some(&pin), true))
            .then_expect_events(vec![InstanceEvent::Registered {
                ip: "10.0.0.1".to_string(),
                mandelbox_capacity: 2,
                auth_token_hash: "auth".to_string(),
                tls_cert_sha256: Some("ab".repeat(32)),
                at: at(),
            }]);
    }

    #[test]
    fn a_required_fingerprint_that_is_missing_or_malformed_refuses_the_registration() {
        for pin in [
            None,
            Some("abc"),
            Some(&*"zz".repeat(32)),
            Some(&*"a".repeat(65)),
        ] {
            InstanceTest::with(())
                .given(launched())
                .when(register_pinned(pin, true))
                .then_expect_error(InstanceError::TlsPinRefused);
        }
        // Not required (plain HTTP, or a CA for host services): none is fine, a malformed one still is not.
        InstanceTest::with(())
            .given(launched())
            .when(register_pinned(Some("abc"), false))
            .then_expect_error(InstanceError::TlsPinRefused);
    }

    fn allocate(mandelbox_id: &str) -> InstanceCommand {
        InstanceCommand::AllocateMandelbox {
            mandelbox_id: mandelbox_id.to_string(),
            user_id: "u".to_string(),
            at: at(),
        }
    }

    #[test]
    fn a_launch_records_the_identity_the_host_must_present() {
        InstanceTest::with(())
            .given_no_previous_events()
            .when(InstanceCommand::RequestLaunch {
                spec: spec(),
                bootstrap_token_hash: "boot".to_string(),
                reason: LaunchReason::WarmBuffer,
                at: at(),
            })
            .then_expect_events(launched());
    }

    #[test]
    fn an_instance_cannot_be_launched_twice() {
        InstanceTest::with(())
            .given(launched())
            .when(InstanceCommand::RequestLaunch {
                spec: spec(),
                bootstrap_token_hash: "boot".to_string(),
                reason: LaunchReason::WarmBuffer,
                at: at(),
            })
            .then_expect_error(InstanceError::AlreadyExists);
    }

    #[test]
    fn a_host_with_the_launch_token_and_identity_becomes_active() {
        InstanceTest::with(())
            .given(launched())
            .when(register("boot", spec()))
            .then_expect_events(vec![InstanceEvent::Registered {
                ip: "10.0.0.1".to_string(),
                mandelbox_capacity: 2,
                auth_token_hash: "auth".to_string(),
                tls_cert_sha256: None,
                at: at(),
            }]);
    }

    #[test]
    fn a_host_with_another_token_is_refused() {
        InstanceTest::with(())
            .given(launched())
            .when(register("forged", spec()))
            .then_expect_error(InstanceError::WrongBootstrapToken);
    }

    #[test]
    fn a_bootstrap_token_works_only_once() {
        InstanceTest::with(())
            .given(active(2))
            .when(register("boot", spec()))
            .then_expect_error(InstanceError::AlreadyRegistered);
    }

    #[test]
    fn a_host_whose_identity_differs_from_its_launch_is_refused() {
        for identity in [
            LaunchSpec {
                region: "eu-west-1".to_string(),
                ..spec()
            },
            LaunchSpec {
                image_id: "ami-2".to_string(),
                ..spec()
            },
            LaunchSpec {
                client_commit_hash: "def".to_string(),
                ..spec()
            },
            LaunchSpec {
                instance_type: "g4dn.xlarge".to_string(),
                ..spec()
            },
        ] {
            InstanceTest::with(())
                .given(launched())
                .when(register("boot", identity))
                .then_expect_error(InstanceError::IdentityMismatch);
        }
    }

    #[test]
    fn an_unknown_instance_cannot_register() {
        InstanceTest::with(())
            .given_no_previous_events()
            .when(register("boot", spec()))
            .then_expect_error(InstanceError::Unknown);
    }

    #[test]
    fn an_active_host_with_room_takes_a_mandelbox() {
        InstanceTest::with(())
            .given(active(2))
            .when(allocate("m1"))
            .then_expect_events(vec![InstanceEvent::MandelboxAllocated {
                mandelbox_id: "m1".to_string(),
                user_id: "u".to_string(),
                live_after: 1,
                at: at(),
            }]);
    }

    #[test]
    fn a_full_host_takes_no_mandelbox() {
        let mut events = active(2);
        allocated(&mut events, "m1", 1);
        allocated(&mut events, "m2", 2);
        InstanceTest::with(())
            .given(events)
            .when(allocate("m3"))
            .then_expect_error(InstanceError::AtCapacity);
    }

    #[test]
    fn allocating_the_same_mandelbox_twice_changes_nothing() {
        let mut events = active(2);
        allocated(&mut events, "m1", 1);
        InstanceTest::with(())
            .given(events)
            .when(allocate("m1"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_host_that_has_not_registered_takes_no_mandelbox() {
        InstanceTest::with(())
            .given(launched())
            .when(allocate("m1"))
            .then_expect_error(InstanceError::NotAcceptingMandelboxes);
    }

    #[test]
    fn a_draining_host_takes_no_new_mandelbox() {
        let mut events = active(2);
        events.push(InstanceEvent::DrainStarted {
            reason: DrainReason::ScaleDown,
            at: at(),
        });
        InstanceTest::with(())
            .given(events)
            .when(allocate("m1"))
            .then_expect_error(InstanceError::NotAcceptingMandelboxes);
    }

    #[test]
    fn freeing_a_mandelbox_frees_its_slot() {
        let mut events = active(1);
        allocated(&mut events, "m1", 1);
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::FreeMandelbox {
                mandelbox_id: "m1".to_string(),
                at: at(),
            })
            .then_expect_events(vec![InstanceEvent::MandelboxFreed {
                mandelbox_id: "m1".to_string(),
                live_after: 0,
                at: at(),
            }]);
    }

    #[test]
    fn freeing_an_unknown_mandelbox_changes_nothing() {
        InstanceTest::with(())
            .given(active(1))
            .when(InstanceCommand::FreeMandelbox {
                mandelbox_id: "m9".to_string(),
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn draining_twice_records_one_drain() {
        let mut events = active(1);
        events.push(InstanceEvent::DrainStarted {
            reason: DrainReason::Operator,
            at: at(),
        });
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::Drain {
                reason: DrainReason::Operator,
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_silent_host_becomes_unresponsive_and_takes_no_mandelbox() {
        let mut events = active(2);
        events.push(InstanceEvent::BecameUnresponsive { at: at() });
        InstanceTest::with(())
            .given(events)
            .when(allocate("m1"))
            .then_expect_error(InstanceError::NotAcceptingMandelboxes);
    }

    #[test]
    fn a_host_heard_from_again_returns_to_its_former_state() {
        let mut instance = Instance::default();
        for event in active(2) {
            instance.apply(event);
        }
        instance.apply(InstanceEvent::DrainStarted {
            reason: DrainReason::ScaleDown,
            at: at(),
        });
        instance.apply(InstanceEvent::BecameUnresponsive { at: at() });
        let events = instance
            .decide(InstanceCommand::MarkResponsive { at: at() })
            .expect("decided");
        assert_eq!(
            events,
            vec![InstanceEvent::BecameResponsive {
                returned_to: InstanceStatus::Draining,
                at: at()
            }]
        );
    }

    #[test]
    fn a_host_that_never_registered_cannot_become_unresponsive() {
        InstanceTest::with(())
            .given(launched())
            .when(InstanceCommand::MarkUnresponsive { at: at() })
            .then_expect_error(InstanceError::InvalidTransition);
    }

    #[test]
    fn terminating_twice_records_one_termination() {
        let mut events = active(1);
        events.push(InstanceEvent::TerminationStarted {
            reason: TerminationReason::Drained,
            at: at(),
        });
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::Operator,
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_launch_reports_one_cloud_instance_only() {
        let mut events = launched();
        events.push(InstanceEvent::Launched {
            cloud_instance_id: "i-1".to_string(),
            at: at(),
        });
        InstanceTest::with(())
            .given(events.clone())
            .when(InstanceCommand::RecordLaunch {
                cloud_instance_id: "i-1".to_string(),
                at: at(),
            })
            .then_expect_events(vec![]);
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::RecordLaunch {
                cloud_instance_id: "i-2".to_string(),
                at: at(),
            })
            .then_expect_error(InstanceError::CloudInstanceMismatch);
    }

    #[test]
    fn a_failed_launch_ends_the_instance() {
        let mut instance = Instance::default();
        for event in launched() {
            instance.apply(event);
        }
        instance.apply(InstanceEvent::LaunchFailed {
            reason: "InsufficientInstanceCapacity".to_string(),
            at: at(),
        });
        assert_eq!(instance.status, Some(InstanceStatus::Terminated));
    }

    #[test]
    fn scaling_down_takes_only_an_empty_host() {
        let mut events = active(2);
        allocated(&mut events, "m1", 1);
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::Drain {
                reason: DrainReason::ScaleDown,
                at: at(),
            })
            .then_expect_error(InstanceError::NotEmpty);
        InstanceTest::with(())
            .given(active(2))
            .when(InstanceCommand::Drain {
                reason: DrainReason::ScaleDown,
                at: at(),
            })
            .then_expect_events(vec![InstanceEvent::DrainStarted {
                reason: DrainReason::ScaleDown,
                at: at(),
            }]);
    }

    #[test]
    fn only_a_silent_host_is_ended_for_silence() {
        InstanceTest::with(())
            .given(active(2))
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::Unresponsive,
                at: at(),
            })
            .then_expect_error(InstanceError::InvalidTransition);
        let mut events = active(2);
        events.push(InstanceEvent::BecameUnresponsive { at: at() });
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::Unresponsive,
                at: at(),
            })
            .then_expect_events(vec![InstanceEvent::TerminationStarted {
                reason: TerminationReason::Unresponsive,
                at: at(),
            }]);
    }

    #[test]
    fn only_a_host_still_booting_is_ended_for_never_registering() {
        InstanceTest::with(())
            .given(active(2))
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::NeverRegistered,
                at: at(),
            })
            .then_expect_error(InstanceError::InvalidTransition);
        InstanceTest::with(())
            .given(launched())
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::NeverRegistered,
                at: at(),
            })
            .then_expect_events(vec![InstanceEvent::TerminationStarted {
                reason: TerminationReason::NeverRegistered,
                at: at(),
            }]);
    }

    #[test]
    fn a_registered_host_on_a_retired_image_is_drained_not_terminated_outright() {
        InstanceTest::with(())
            .given(active(2))
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::ImageRetired,
                at: at(),
            })
            .then_expect_error(InstanceError::InvalidTransition);
        InstanceTest::with(())
            .given(launched())
            .when(InstanceCommand::Terminate {
                reason: TerminationReason::ImageRetired,
                at: at(),
            })
            .then_expect_events(vec![InstanceEvent::TerminationStarted {
                reason: TerminationReason::ImageRetired,
                at: at(),
            }]);
    }

    #[test]
    fn a_host_with_mandelboxes_on_a_retired_image_drains_keeping_them() {
        let mut events = active(2);
        events.push(InstanceEvent::MandelboxAllocated {
            mandelbox_id: "m1".to_string(),
            user_id: "u1".to_string(),
            live_after: 1,
            at: at(),
        });
        InstanceTest::with(())
            .given(events)
            .when(InstanceCommand::Drain {
                reason: DrainReason::ImageRetired,
                at: at(),
            })
            .then_expect_events(vec![InstanceEvent::DrainStarted {
                reason: DrainReason::ImageRetired,
                at: at(),
            }]);
    }

    fn stray(id: &str) -> InstanceCommand {
        InstanceCommand::TerminateStray {
            region: "us-east-1".to_string(),
            cloud_instance_id: id.to_string(),
            at: at(),
        }
    }

    #[test]
    fn a_second_instance_of_a_launch_is_a_stray_but_its_host_is_not() {
        let mut events = active(2);
        events.push(InstanceEvent::Launched {
            cloud_instance_id: "i-1".to_string(),
            at: at(),
        });
        InstanceTest::with(())
            .given(events.clone())
            .when(stray("i-1"))
            .then_expect_error(InstanceError::NotAStray);
        InstanceTest::with(())
            .given(events)
            .when(stray("i-2"))
            .then_expect_events(vec![InstanceEvent::StrayTerminated {
                region: "us-east-1".to_string(),
                cloud_instance_id: "i-2".to_string(),
                at: at(),
            }]);
    }

    #[test]
    fn a_launch_awaiting_its_instance_adopts_rather_than_ends_it() {
        InstanceTest::with(())
            .given(launched())
            .when(stray("i-1"))
            .then_expect_error(InstanceError::NotAStray);
    }

    #[test]
    fn a_host_that_registered_before_its_launch_was_recorded_adopts_rather_than_ends_its_instance()
    {
        InstanceTest::with(())
            .given(active(2))
            .when(stray("i-1"))
            .then_expect_error(InstanceError::NotAStray);
    }

    #[test]
    fn an_instance_outliving_its_record_or_without_one_is_a_stray_once() {
        let mut events = launched();
        events.push(InstanceEvent::Launched {
            cloud_instance_id: "i-1".to_string(),
            at: at(),
        });
        events.push(InstanceEvent::Terminated { at: at() });
        InstanceTest::with(())
            .given(events.clone())
            .when(stray("i-1"))
            .then_expect_events(vec![InstanceEvent::StrayTerminated {
                region: "us-east-1".to_string(),
                cloud_instance_id: "i-1".to_string(),
                at: at(),
            }]);
        events.push(InstanceEvent::StrayTerminated {
            region: "us-east-1".to_string(),
            cloud_instance_id: "i-1".to_string(),
            at: at(),
        });
        InstanceTest::with(())
            .given(events)
            .when(stray("i-1"))
            .then_expect_events(vec![]);
        InstanceTest::with(())
            .given_no_previous_events()
            .when(stray("i-9"))
            .then_expect_events(vec![InstanceEvent::StrayTerminated {
                region: "us-east-1".to_string(),
                cloud_instance_id: "i-9".to_string(),
                at: at(),
            }]);
    }

    fn any_command() -> impl Strategy<Value = InstanceCommand> {
        let mandelbox = (0u8..8).prop_map(|n| format!("m{n}"));
        prop_oneof![
            4 => mandelbox.clone().prop_map(|id| allocate(&id)),
            2 => mandelbox.prop_map(|id| InstanceCommand::FreeMandelbox { mandelbox_id: id, at: at() }),
            1 => Just(InstanceCommand::Drain { reason: DrainReason::ScaleDown, at: at() }),
            1 => Just(InstanceCommand::MarkUnresponsive { at: at() }),
            1 => Just(InstanceCommand::MarkResponsive { at: at() }),
            1 => Just(InstanceCommand::Terminate { reason: TerminationReason::Drained, at: at() }),
            1 => Just(register("boot", spec())),
        ]
    }

    fn decide_and_apply(instance: &mut Instance, command: InstanceCommand) -> Vec<InstanceEvent> {
        match instance.decide(command) {
            Ok(events) => {
                for event in &events {
                    instance.apply(event.clone());
                }
                events
            }
            Err(_) => vec![],
        }
    }

    proptest! {
        #[test]
        fn any_history_reads_the_same_from_a_snapshot_and_the_events_after_it(
            capacity in 0u32..5,
            commands in proptest::collection::vec(any_command(), 0..60),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut instance = Instance::default();
            let mut events = active(capacity);
            for event in &events {
                instance.apply(event.clone());
            }
            for command in commands {
                events.extend(decide_and_apply(&mut instance, command));
            }
            let cut = cut.index(events.len() + 1);
            prop_assert!(crate::decide::resumes_from_a_snapshot::<Instance>(&events, cut));
        }

        #[test]
        fn no_sequence_of_commands_puts_a_host_over_capacity_or_feeds_a_host_that_is_not_active(
            capacity in 0u32..5,
            commands in proptest::collection::vec(any_command(), 0..60),
        ) {
            let mut instance = Instance::default();
            for event in active(capacity) {
                instance.apply(event);
            }
            for command in commands {
                let before = instance.status;
                let events = decide_and_apply(&mut instance, command);
                prop_assert!(instance.live() <= capacity, "over capacity");
                for event in events {
                    if matches!(event, InstanceEvent::MandelboxAllocated { .. }) {
                        prop_assert_eq!(before, Some(InstanceStatus::Active));
                    }
                }
                if before == Some(InstanceStatus::Terminated) {
                    prop_assert_eq!(instance.status, Some(InstanceStatus::Terminated));
                }
            }
        }
    }
}
