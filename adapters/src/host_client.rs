//! Calls from the webserver to a host service (`PUT /spin_up_mandelbox`, `POST /drain_and_shutdown`).

use std::time::Duration;

use serde::Serialize;

/// Body of `PUT /spin_up_mandelbox`.
#[derive(Debug, Clone, Serialize)]
pub struct SpinUp {
    pub mandelbox_id: String,
    pub session_id: i64,
    pub user_id: String,
    pub app_name: String,
    pub protocol_secret: String,
}

/// A call to a host service failed.
#[derive(Debug, thiserror::Error)]
pub enum HostCallError {
    #[error("the host service did not answer: {0}")]
    Unreachable(String),
    #[error("the host service answered {0}")]
    Refused(u16),
    #[error("{0} is not a loopback address, and simulated hosts only live on loopback")]
    NotLoopback(String),
}

/// Talks to host services at `{scheme}://{ip}:{port}`.
#[derive(Clone, Debug)]
pub struct HostClient {
    http: reqwest::Client,
    scheme: String,
    port: u16,
    loopback_only: bool,
}

impl HostClient {
    /// A client for hosts at `{scheme}://{ip}:{port}`; with `loopback_only` (simulated hosts) it refuses to call
    /// any address outside 127.0.0.0/8, whatever a registration claimed.
    pub fn new(scheme: &str, port: u16, loopback_only: bool) -> Self {
        crate::tls::ensure_crypto_provider();
        Self {
            loopback_only,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            scheme: scheme.to_string(),
            port,
        }
    }

    fn url(&self, ip: &str, path: &str) -> Result<String, HostCallError> {
        if self.loopback_only
            && !ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(|address| address.is_loopback())
        {
            return Err(HostCallError::NotLoopback(ip.to_string()));
        }
        Ok(format!("{}://{ip}:{}{path}", self.scheme, self.port))
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

    #[tokio::test]
    async fn a_loopback_only_client_never_calls_another_address() {
        let client = HostClient::new("http", 9, true);
        let body = SpinUp {
            mandelbox_id: "m".to_string(),
            session_id: 1,
            user_id: "u".to_string(),
            app_name: "a".to_string(),
            protocol_secret: "s".to_string(),
        };
        for ip in ["10.0.0.1", "192.168.1.1", "8.8.8.8", "not-an-ip"] {
            assert!(matches!(
                client.spin_up(ip, "t", &body).await,
                Err(HostCallError::NotLoopback(_))
            ));
        }
    }
}
