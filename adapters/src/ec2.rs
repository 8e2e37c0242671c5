//! EC2 through aws-sdk-ec2: launch, find by tag, terminate; one client per region.
//!
//! Every instance carries two tags: `whist:deployment` (which webserver deployment owns it) and `whist:launch` (the
//! instance aggregate id, i.e. the launch decision). A launch first looks for an instance already tagged with its
//! launch id and adopts it: the `ClientToken` alone does not make a retried launch safe (tokens expire, and moto
//! ignores them), the tag does; so `RunInstances` is never retried by the SDK itself (a retry after a lost answer
//! would rely on the token alone), only by the launch job, which looks for the tag first. Capacity and throttling
//! errors, timeouts and 5xx answers (whatever their body) are worth retrying; other refusals are final. Every call is
//! bounded in time (`ATTEMPT_TIMEOUT`, `OPERATION_TIMEOUT`): an EC2 endpoint that takes a request and never answers
//! costs a retry, never a job (or the repair) waiting for ever.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};
use base64::Engine;
use tokio::sync::Mutex;

/// Tag naming the deployment that owns an instance.
pub const DEPLOYMENT_TAG: &str = "whist:deployment";
/// Tag naming the launch decision (the instance aggregate id).
pub const LAUNCH_TAG: &str = "whist:launch";

/// How long one attempt of an EC2 call may wait for its answer (the SDK sets no read timeout of its own).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one EC2 call may take, the SDK's own retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Error codes EC2 uses for a refusal that may pass: capacity, throttling, its own trouble.
const RETRYABLE_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ServiceUnavailable",
    "Unavailable",
    "InternalError",
    "InternalFailure",
];

/// Why an EC2 call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ec2Error {
    /// Worth retrying with backoff: capacity, throttling, timeouts, connection failures, 5xx.
    #[error("EC2 is temporarily unable to do it: {0}")]
    Retryable(String),
    /// Final: the request itself is refused (bad image, bad instance type, no permission, …).
    #[error("EC2 refused: {0}")]
    Refused(String),
}

fn classify<E>(error: SdkError<E, HttpResponse>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let text = match &error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default().to_string();
            let message = service.err().message().unwrap_or_default().to_string();
            let status = service.raw().status();
            let text = format!("{code}: {message} (HTTP {})", status.as_u16());
            // A 5xx is EC2's (or a proxy's) trouble, not a verdict on the request, whatever its body says.
            if RETRYABLE_CODES.contains(&code.as_str()) || status.is_server_error() {
                return Ec2Error::Retryable(text);
            }
            return Ec2Error::Refused(text);
        }
        SdkError::TimeoutError(_) => "timed out".to_string(),
        SdkError::DispatchFailure(failure) => format!("could not reach EC2: {failure:?}"),
        SdkError::ResponseError(response) => format!("unreadable answer: {response:?}"),
        other => other.to_string(),
    };
    Ec2Error::Retryable(text)
}

/// What to launch.
#[derive(Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    /// The instance aggregate id: the launch decision, tagged on the instance and the idempotency key.
    pub launch_id: String,
    pub region: String,
    pub image_id: String,
    pub instance_type: String,
    /// Plain `KEY=value` lines (base64-encoded here, as EC2 wants).
    pub user_data: String,
}

impl std::fmt::Debug for LaunchRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The user data carries the host's bootstrap token.
        formatter
            .debug_struct("LaunchRequest")
            .field("launch_id", &self.launch_id)
            .field("region", &self.region)
            .field("image_id", &self.image_id)
            .field("instance_type", &self.instance_type)
            .field("user_data", &"[redacted]")
            .finish()
    }
}

/// An instance as EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInstance {
    pub cloud_instance_id: String,
    /// The launch id tag, if the instance carries one.
    pub launch_id: Option<String>,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping` or `stopped`.
    pub state: String,
    pub private_ip: Option<String>,
}

impl CloudInstance {
    /// Whether the instance is still (or about to be) costing money.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state.as_str(),
            "pending" | "running" | "stopping" | "stopped"
        )
    }
}

/// How to reach EC2: the standard environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, credentials), or an explicit
/// endpoint with static credentials (tests against moto).
#[derive(Clone, Default)]
pub struct Ec2Access {
    pub endpoint_url: Option<String>,
    /// `(access key id, secret access key)`.
    pub static_credentials: Option<(String, String)>,
}

impl std::fmt::Debug for Ec2Access {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Ec2Access")
            .field("endpoint_url", &self.endpoint_url)
            .field(
                "static_credentials",
                &self
                    .static_credentials
                    .as_ref()
                    .map(|(key_id, _)| (key_id, "[redacted]")),
            )
            .finish()
    }
}

/// EC2 in any number of regions, for one deployment.
#[derive(Clone)]
pub struct Ec2 {
    deployment: String,
    access: Ec2Access,
    clients: Arc<Mutex<HashMap<String, aws_sdk_ec2::Client>>>,
}

impl std::fmt::Debug for Ec2 {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Ec2")
            .field("deployment", &self.deployment)
            .finish_non_exhaustive()
    }
}

impl Ec2 {
    /// EC2 for the instances of `deployment` (the tag value that marks them as ours).
    pub fn new(deployment: &str, access: Ec2Access) -> Self {
        Self {
            deployment: deployment.to_string(),
            access,
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    async fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(region) {
            return client.clone();
        }
        crate::tls::ensure_crypto_provider();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()));
        if let Some(endpoint) = &self.access.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((key, secret)) = &self.access.static_credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                key,
                secret,
                None,
                None,
                "whist-static",
            ));
        }
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .operation_timeout(OPERATION_TIMEOUT)
            .build();
        let config = loader.timeout_config(timeouts).load().await;
        let client = aws_sdk_ec2::Client::new(&config);
        clients.insert(region.to_string(), client.clone());
        client
    }

    /// Launches one instance for `request`, or adopts the one an earlier attempt of the same launch started.
    ///
    /// # Errors
    /// EC2 refused or could not be reached; see `Ec2Error` for which is worth retrying.
    pub async fn launch(&self, request: &LaunchRequest) -> Result<CloudInstance, Ec2Error> {
        if let Some(existing) = self
            .find_launch(&request.region, &request.launch_id)
            .await?
        {
            tracing::info!(
                launch_id = request.launch_id,
                cloud_instance_id = existing.cloud_instance_id,
                "adopting the instance an earlier attempt launched"
            );
            return Ok(existing);
        }
        let client = self.client(&request.region).await;
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(
                Tag::builder()
                    .key(DEPLOYMENT_TAG)
                    .value(&self.deployment)
                    .build(),
            )
            .tags(
                Tag::builder()
                    .key(LAUNCH_TAG)
                    .value(&request.launch_id)
                    .build(),
            )
            .tags(
                Tag::builder()
                    .key("Name")
                    .value(format!("whist-{}-{}", self.deployment, request.launch_id))
                    .build(),
            )
            .build();
        let output = client
            .run_instances()
            .image_id(&request.image_id)
            .instance_type(InstanceType::from(request.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&request.user_data))
            .client_token(client_token(&request.launch_id))
            .tag_specifications(tags)
            // IMDSv2 only: the metadata service answers only requests that first obtained a session token with a
            // PUT, so a request forged through anything on the host that fetches URLs (SSRF) learns nothing.
            .metadata_options(
                aws_sdk_ec2::types::InstanceMetadataOptionsRequest::builder()
                    .http_tokens(aws_sdk_ec2::types::HttpTokensState::Required)
                    .http_endpoint(aws_sdk_ec2::types::InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .customize()
            // A lost answer must lead back to the tag lookup above, not to a second `RunInstances`.
            .config_override(aws_sdk_ec2::Config::builder().retry_config(RetryConfig::disabled()))
            .send()
            .await
            .map_err(classify)?;
        let instance = output
            .instances()
            .first()
            .ok_or_else(|| Ec2Error::Retryable("RunInstances answered no instance".to_string()))?;
        Ok(cloud_instance(instance, Some(request.launch_id.clone())))
    }

    /// The live instance of one launch, if EC2 has one.
    ///
    /// # Errors
    /// EC2 could not be asked.
    pub async fn find_launch(
        &self,
        region: &str,
        launch_id: &str,
    ) -> Result<Option<CloudInstance>, Ec2Error> {
        let found = self
            .describe(region, Some(launch_id))
            .await?
            .into_iter()
            .find(CloudInstance::is_live);
        Ok(found)
    }

    /// Every instance of this deployment in `region` that EC2 still lists (terminated ones included while EC2
    /// shows them).
    ///
    /// # Errors
    /// EC2 could not be asked.
    pub async fn list(&self, region: &str) -> Result<Vec<CloudInstance>, Ec2Error> {
        self.describe(region, None).await
    }

    async fn describe(
        &self,
        region: &str,
        launch_id: Option<&str>,
    ) -> Result<Vec<CloudInstance>, Ec2Error> {
        let client = self.client(region).await;
        let mut request = client.describe_instances().filters(
            Filter::builder()
                .name(format!("tag:{DEPLOYMENT_TAG}"))
                .values(&self.deployment)
                .build(),
        );
        if let Some(launch_id) = launch_id {
            request = request.filters(
                Filter::builder()
                    .name(format!("tag:{LAUNCH_TAG}"))
                    .values(launch_id)
                    .build(),
            );
        }
        let mut pages = request.into_paginator().send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(classify)?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    let launch_id = instance
                        .tags()
                        .iter()
                        .find(|tag| tag.key() == Some(LAUNCH_TAG))
                        .and_then(|tag| tag.value())
                        .map(str::to_string);
                    found.push(cloud_instance(instance, launch_id));
                }
            }
        }
        Ok(found)
    }

    /// Terminates instances (idempotent: terminating a terminated instance succeeds).
    ///
    /// # Errors
    /// EC2 refused or could not be reached.
    pub async fn terminate(
        &self,
        region: &str,
        cloud_instance_ids: &[String],
    ) -> Result<(), Ec2Error> {
        if cloud_instance_ids.is_empty() {
            return Ok(());
        }
        let client = self.client(region).await;
        client
            .terminate_instances()
            .set_instance_ids(Some(cloud_instance_ids.to_vec()))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }
}

fn cloud_instance(
    instance: &aws_sdk_ec2::types::Instance,
    launch_id: Option<String>,
) -> CloudInstance {
    CloudInstance {
        cloud_instance_id: instance.instance_id().unwrap_or_default().to_string(),
        launch_id,
        state: instance
            .state()
            .and_then(|state| state.name())
            .map_or("pending", InstanceStateName::as_str)
            .to_string(),
        private_ip: instance.private_ip_address().map(str::to_string),
    }
}

/// EC2's idempotency token for a launch (at most 64 ASCII characters).
pub fn client_token(launch_id: &str) -> String {
    let token: String = launch_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(58)
        .collect();
    format!("whist-{token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_user_data_nor_a_secret_key_is_ever_printed() {
        let request = LaunchRequest {
            launch_id: "l".to_string(),
            region: "us-east-1".to_string(),
            image_id: "ami-1".to_string(),
            instance_type: "g4dn.2xlarge".to_string(),
            user_data: "WHIST_BOOTSTRAP_TOKEN=hunter2\n".to_string(),
        };
        assert!(!format!("{request:?}").contains("hunter2"));
        let access = Ec2Access {
            endpoint_url: None,
            static_credentials: Some(("AKIA".to_string(), "hunter2".to_string())),
        };
        let printed = format!("{access:?}");
        assert!(!printed.contains("hunter2") && printed.contains("AKIA"));
    }
}
