//! Hosts booting on moto's instances: what a real EC2 machine does after `RunInstances`, played on loopback. Every
//! live instance of the deployment in moto gets a host service (a simulated host) that reads its launch's user data
//! (`WHIST_BOOTSTRAP_TOKEN`, `WHIST_INSTANCE_ID`, `WHIST_WEBSERVER_URL`, the way the real host reads it from the
//! instance metadata), registers with the image and instance type moto reports, heartbeats, and when it shuts down
//! after draining terminates its own instance (a machine launched with shutdown behaviour `terminate`). A test can
//! also silence a host (a hung machine: the instance stays, the host service stops answering).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use base64::Engine;
use tokio::sync::watch;
use whist_adapters::simulated_host::{self, SimulatedHost, SimulatedHostSpec};

/// What the hosts are told about themselves that moto does not know.
#[derive(Debug, Clone)]
pub struct HostImages {
    /// Image id → the client commit hash the image was built with.
    pub commit_hashes: HashMap<String, String>,
    pub capacity: u32,
    /// The port host services listen on (the webserver's `HOST_SERVICE_PORT`).
    pub port: u16,
}

#[derive(Default)]
struct Booted {
    /// Cloud instance id → its running host service.
    running: HashMap<String, SimulatedHost>,
    /// Cloud instances whose host service must not start again (silenced or shut down).
    finished: HashSet<String>,
    /// Cloud instance id → launch id.
    launch_ids: HashMap<String, String>,
}

/// The booting machinery; stops when dropped.
pub struct MotoHosts {
    booted: Arc<Mutex<Booted>>,
    stop: watch::Sender<bool>,
}

async fn client(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    whist_adapters::tls::ensure_crypto_provider();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}

fn user_data_value<'a>(user_data: &'a str, key: &str) -> Option<&'a str> {
    user_data
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

impl MotoHosts {
    /// Boots a host service on every live instance of `deployment` in `regions`, as they appear.
    pub fn start(endpoint: &str, deployment: &str, regions: &[&str], images: HostImages) -> Self {
        let booted = Arc::new(Mutex::new(Booted::default()));
        let (stop, mut stopped) = watch::channel(false);
        let endpoint = endpoint.to_string();
        let deployment = deployment.to_string();
        let regions: Vec<String> = regions.iter().map(|region| region.to_string()).collect();
        let shared = booted.clone();
        tokio::spawn(async move {
            let mut clients = Vec::new();
            for region in &regions {
                clients.push((region.clone(), client(&endpoint, region).await));
            }
            loop {
                for (region, client) in &clients {
                    boot_new(client, region, &deployment, &images, &shared).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stopped.changed() => return,
                }
            }
        });
        Self { booted, stop }
    }

    /// Stops the host service on `cloud_instance_id` without ending the instance: the machine hangs.
    pub fn silence(&self, cloud_instance_id: &str) {
        if let Ok(mut booted) = self.booted.lock() {
            booted.finished.insert(cloud_instance_id.to_string());
            if let Some(host) = booted.running.remove(cloud_instance_id) {
                host.stop();
            }
        }
    }

    /// Cloud instance ids whose host service is running.
    pub fn running(&self) -> Vec<String> {
        self.booted
            .lock()
            .map(|booted| booted.running.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The launch id (instance aggregate id) of a booted cloud instance.
    pub fn launch_id(&self, cloud_instance_id: &str) -> Option<String> {
        self.booted
            .lock()
            .ok()
            .and_then(|booted| booted.launch_ids.get(cloud_instance_id).cloned())
    }
}

impl Drop for MotoHosts {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Ok(mut booted) = self.booted.lock() {
            for host in booted.running.values() {
                host.stop();
            }
            booted.running.clear();
        }
    }
}

async fn boot_new(
    client: &aws_sdk_ec2::Client,
    region: &str,
    deployment: &str,
    images: &HostImages,
    booted: &Arc<Mutex<Booted>>,
) {
    let Ok(described) = client
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:whist:deployment")
                .values(deployment)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
    else {
        return;
    };
    let instances: Vec<_> = described
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances())
        .cloned()
        .collect();
    for instance in instances {
        let Some(cloud_instance_id) = instance.instance_id().map(str::to_string) else {
            continue;
        };
        let known = booted.lock().is_ok_and(|booted| {
            booted.running.contains_key(&cloud_instance_id)
                || booted.finished.contains(&cloud_instance_id)
        });
        if known {
            continue;
        }
        let Ok(attribute) = client
            .describe_instance_attribute()
            .instance_id(&cloud_instance_id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
        else {
            continue;
        };
        let user_data = attribute
            .user_data()
            .and_then(|value| value.value())
            .and_then(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()
            })
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .unwrap_or_default();
        let (Some(token), Some(instance_id), Some(webserver_url)) = (
            user_data_value(&user_data, "WHIST_BOOTSTRAP_TOKEN"),
            user_data_value(&user_data, "WHIST_INSTANCE_ID"),
            user_data_value(&user_data, "WHIST_WEBSERVER_URL"),
        ) else {
            continue;
        };
        let image_id = instance.image_id().unwrap_or_default().to_string();
        let spec = SimulatedHostSpec {
            instance_id: instance_id.to_string(),
            bootstrap_token: token.to_string(),
            webserver_url: webserver_url.to_string(),
            region: region.to_string(),
            instance_type: instance
                .instance_type()
                .map(|kind| kind.as_str().to_string())
                .unwrap_or_default(),
            client_commit_hash: images
                .commit_hashes
                .get(&image_id)
                .cloned()
                .unwrap_or_default(),
            image_id,
            mandelbox_capacity: images.capacity,
            port: images.port,
            // Over HTTPS, as the webserver calls real hosts: a self-signed certificate, pinned at registration.
            tls: simulated_host::HostTls::SelfSigned,
        };
        let Ok(host) = simulated_host::start(spec).await else {
            continue;
        };
        // When the host service shuts down by itself (after draining), the machine powers off and terminates.
        let mut stopped = host.stopped();
        let terminate = client.clone();
        let watched = booted.clone();
        let id = cloud_instance_id.clone();
        tokio::spawn(async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
            let silenced = watched
                .lock()
                .map(|mut booted| {
                    let silenced = booted.finished.contains(&id);
                    booted.finished.insert(id.clone());
                    booted.running.remove(&id);
                    silenced
                })
                .unwrap_or(true);
            if !silenced {
                let _ = terminate
                    .terminate_instances()
                    .instance_ids(&id)
                    .send()
                    .await;
            }
        });
        if let Ok(mut booted) = booted.lock() {
            booted
                .launch_ids
                .insert(cloud_instance_id.clone(), instance_id.to_string());
            booted.running.insert(cloud_instance_id, host);
        }
    }
}
