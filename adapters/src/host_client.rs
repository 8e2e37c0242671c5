//! Calls from the webserver to a host service (`PUT /spin_up_mandelbox`, `POST /drain_and_shutdown`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::Serialize;
use whist_domain::instance::RegistrationRules;

/// Body of `PUT /spin_up_mandelbox`.
#[derive(Clone, Serialize)]
pub struct SpinUp {
    pub mandelbox_id: String,
    pub session_id: i64,
    pub user_id: String,
    pub app_name: String,
    pub protocol_secret: String,
}

impl std::fmt::Debug for SpinUp {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SpinUp")
            .field("mandelbox_id", &self.mandelbox_id)
            .field("session_id", &self.session_id)
            .field("user_id", &self.user_id)
            .field("app_name", &self.app_name)
            .field("protocol_secret", &"[redacted]")
            .finish()
    }
}

/// A call to a host service failed.
#[derive(Debug, thiserror::Error)]
pub enum HostCallError {
    #[error("the host service did not answer: {0}")]
    Unreachable(String),
    #[error("the host service answered {0}")]
    Refused(u16),
    #[error("{0} is not an address hosts may have (a bare IP address in HOST_NETWORK_CIDRS, not link-local, multicast or unspecified)")]
    AddressRefused(String),
    #[error("the host registered no certificate fingerprint, and without HOST_SERVICE_CA_PEM nothing else can authenticate it over https")]
    NoPinnedCertificate,
}

/// How the webserver knows it is talking to the host service it means to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostTrust {
    /// `HOST_SERVICE_SCHEME=http`: no TLS at all.
    Plain,
    /// `https` without a CA (the contract's default): a host's certificate must be the one whose SHA-256 it
    /// declared at registration, whoever signed it.
    Pinned,
    /// `https` with `HOST_SERVICE_CA_PEM`: a host's certificate must chain to one of these CA certificates and name
    /// the host's IP address.
    Authority(Vec<CertificateDer<'static>>),
}

impl HostTrust {
    fn scheme(&self) -> &'static str {
        match self {
            Self::Plain => "http",
            Self::Pinned | Self::Authority(_) => "https",
        }
    }
}

/// A host to call: its address and, when it declared one at registration, its certificate's fingerprint.
#[derive(Clone, Copy, Debug)]
pub struct HostEndpoint<'a> {
    pub ip: &'a str,
    pub tls_cert_sha256: Option<&'a str>,
}

/// Pinned clients kept at most (one per host certificate); past this the cache starts over.
const PINNED_CLIENTS: usize = 4096;

/// Talks to host services at `{scheme}://{ip}:{port}`.
#[derive(Clone, Debug)]
pub struct HostClient {
    /// The client for plain HTTP, or for hosts under the CA.
    shared: reqwest::Client,
    /// With [`HostTrust::Pinned`]: one client per certificate fingerprint, so that connections to a host are reused
    /// and never shared with a host that presents another certificate.
    pinned: Arc<Mutex<HashMap<String, reqwest::Client>>>,
    trust: HostTrust,
    port: u16,
    /// The addresses a host may have, by the same rules as its registration: whatever the log says, the client
    /// never calls an address a registration would have been refused for.
    rules: RegistrationRules,
}

/// The builder every host client starts from: a short timeout, and no redirects (a host service that answers with
/// one is refused, not followed elsewhere).
fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
}

impl HostClient {
    /// A client for hosts at `{scheme}://{ip}:{port}`, trusting them as `trust` says, that calls only addresses
    /// inside `host_networks`.
    pub fn new(trust: HostTrust, port: u16, host_networks: Vec<ipnet::IpNet>) -> Self {
        crate::tls::ensure_crypto_provider();
        let shared = match &trust {
            HostTrust::Authority(authorities) => client_builder()
                .use_preconfigured_tls(crate::tls::client_config_trusting(authorities)),
            HostTrust::Plain | HostTrust::Pinned => client_builder(),
        };
        Self {
            shared: shared.build().unwrap_or_default(),
            pinned: Arc::default(),
            trust,
            port,
            rules: RegistrationRules {
                host_networks,
                max_capacity: u32::MAX,
                require_tls_pin: false,
            },
        }
    }

    /// The URL of `path` on the host at `ip`, built from the parsed address (so nothing in `ip` can add a port,
    /// a path or another host).
    fn url(&self, ip: &str, path: &str) -> Result<String, HostCallError> {
        let address = self
            .rules
            .host_address(ip)
            .map_err(|_| HostCallError::AddressRefused(ip.to_string()))?;
        let socket = std::net::SocketAddr::new(address, self.port);
        Ok(format!("{}://{socket}{path}", self.trust.scheme()))
    }

    /// The client that may call `host`: for a pinned host, the one that accepts only its certificate.
    fn client_for(&self, host: HostEndpoint<'_>) -> Result<reqwest::Client, HostCallError> {
        if self.trust != HostTrust::Pinned {
            return Ok(self.shared.clone());
        }
        let pin = host
            .tls_cert_sha256
            .ok_or(HostCallError::NoPinnedCertificate)?
            .to_ascii_lowercase();
        let mut pinned = self.pinned.lock().map_err(|_| {
            HostCallError::Unreachable("the pinned client cache is poisoned".to_string())
        })?;
        if let Some(client) = pinned.get(&pin) {
            return Ok(client.clone());
        }
        if pinned.len() >= PINNED_CLIENTS {
            pinned.clear();
        }
        let client = client_builder()
            .use_preconfigured_tls(crate::tls::client_config_pinned(&pin))
            .build()
            .map_err(|error| HostCallError::Unreachable(crate::tls::error_chain(&error)))?;
        pinned.insert(pin, client.clone());
        Ok(client)
    }

    /// Sends a request built by `request` to `path` on `host`, with the trace context of its own span, and reads
    /// whether it succeeded.
    #[tracing::instrument(name = "host call", skip_all, fields(path = path, host = %host.ip))]
    async fn call(
        &self,
        host: HostEndpoint<'_>,
        path: &str,
        request: impl FnOnce(&reqwest::Client, String) -> reqwest::RequestBuilder,
    ) -> Result<(), HostCallError> {
        let url = self.url(host.ip, path)?;
        let client = self.client_for(host)?;
        let response = crate::trace_context::inject(request(&client, url))
            .send()
            .await
            .map_err(|error| HostCallError::Unreachable(crate::tls::error_chain(&error)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(HostCallError::Refused(response.status().as_u16()))
        }
    }

    /// Asks the host to start a mandelbox.
    ///
    /// # Errors
    /// The host did not answer (or presented a certificate it may not), or answered with an error status.
    pub async fn spin_up(
        &self,
        host: HostEndpoint<'_>,
        auth_token: &str,
        body: &SpinUp,
    ) -> Result<(), HostCallError> {
        self.call(host, "/spin_up_mandelbox", |client, url| {
            client.put(url).bearer_auth(auth_token).json(body)
        })
        .await
    }

    /// Asks the host to drain and shut down.
    ///
    /// # Errors
    /// The host did not answer (or presented a certificate it may not), or answered with an error status.
    pub async fn drain_and_shutdown(
        &self,
        host: HostEndpoint<'_>,
        auth_token: &str,
    ) -> Result<(), HostCallError> {
        self.call(host, "/drain_and_shutdown", |client, url| {
            client
                .post(url)
                .bearer_auth(auth_token)
                .json(&serde_json::json!({}))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_client() -> HostClient {
        HostClient::new(
            HostTrust::Plain,
            9,
            vec!["127.0.0.0/8".parse().expect("a CIDR")],
        )
    }

    #[tokio::test]
    async fn a_client_never_calls_an_address_outside_the_host_networks() {
        let client = loopback_client();
        let body = SpinUp {
            mandelbox_id: "m".to_string(),
            session_id: 1,
            user_id: "u".to_string(),
            app_name: "a".to_string(),
            protocol_secret: "s".to_string(),
        };
        for ip in [
            "10.0.0.1",
            "169.254.169.254",
            "8.8.8.8",
            "not-an-ip",
            "127.0.0.1:80",
            "127.0.0.1/x",
            "127.0.0.1@10.0.0.1",
        ] {
            assert!(
                matches!(
                    client
                        .spin_up(
                            HostEndpoint {
                                ip,
                                tls_cert_sha256: None
                            },
                            "t",
                            &body
                        )
                        .await,
                    Err(HostCallError::AddressRefused(_))
                ),
                "{ip}"
            );
        }
    }

    #[test]
    fn a_spin_up_never_prints_its_protocol_secret() {
        let body = SpinUp {
            mandelbox_id: "m".to_string(),
            session_id: 1,
            user_id: "u".to_string(),
            app_name: "a".to_string(),
            protocol_secret: "hunter2".to_string(),
        };
        let printed = format!("{body:?}");
        assert!(!printed.contains("hunter2") && printed.contains("[redacted]"));
    }

    #[test]
    fn urls_are_built_from_the_parsed_address() {
        let client = HostClient::new(
            HostTrust::Pinned,
            4678,
            vec!["::/0".parse().expect("a CIDR")],
        );
        assert_eq!(
            client.url("2001:db8::1", "/x").expect("allowed"),
            "https://[2001:db8::1]:4678/x"
        );
        assert_eq!(
            loopback_client().url("127.0.0.1", "/x").expect("allowed"),
            "http://127.0.0.1:9/x"
        );
    }
}
