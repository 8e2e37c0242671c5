//! Calls from the webserver to a host service (`PUT /spin_up_mandelbox`, `POST /drain_and_shutdown`).

use std::time::Duration;

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
}

/// Talks to host services at `{scheme}://{ip}:{port}`.
#[derive(Clone, Debug)]
pub struct HostClient {
    http: reqwest::Client,
    scheme: String,
    port: u16,
    /// The addresses a host may have, by the same rules as its registration: whatever the log says, the client
    /// never calls an address a registration would have been refused for.
    rules: RegistrationRules,
}

impl HostClient {
    /// A client for hosts at `{scheme}://{ip}:{port}` that calls only addresses inside `host_networks`. It follows
    /// no redirects: a host service that answers with one is refused, not followed elsewhere.
    pub fn new(scheme: &str, port: u16, host_networks: Vec<ipnet::IpNet>) -> Self {
        crate::tls::ensure_crypto_provider();
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            scheme: scheme.to_string(),
            port,
            rules: RegistrationRules {
                host_networks,
                max_capacity: u32::MAX,
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
        Ok(format!("{}://{socket}{path}", self.scheme))
    }

    /// Asks the host to start a mandelbox.
    ///
    /// # Errors
    /// The host did not answer or answered with an error status.
    pub async fn spin_up(
        &self,
        ip: &str,
        auth_token: &str,
        body: &SpinUp,
    ) -> Result<(), HostCallError> {
        let response = self
            .http
            .put(self.url(ip, "/spin_up_mandelbox")?)
            .bearer_auth(auth_token)
            .json(body)
            .send()
            .await
            .map_err(|error| HostCallError::Unreachable(error.to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(HostCallError::Refused(response.status().as_u16()))
        }
    }

    /// Asks the host to drain and shut down.
    ///
    /// # Errors
    /// The host did not answer or answered with an error status.
    pub async fn drain_and_shutdown(
        &self,
        ip: &str,
        auth_token: &str,
    ) -> Result<(), HostCallError> {
        let response = self
            .http
            .post(self.url(ip, "/drain_and_shutdown")?)
            .bearer_auth(auth_token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .map_err(|error| HostCallError::Unreachable(error.to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(HostCallError::Refused(response.status().as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_client() -> HostClient {
        HostClient::new("http", 9, vec!["127.0.0.0/8".parse().expect("a CIDR")])
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
                    client.spin_up(ip, "t", &body).await,
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
        let client = HostClient::new("https", 4678, vec!["::/0".parse().expect("a CIDR")]);
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
