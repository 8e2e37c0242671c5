//! Checking bearer tokens: Auth0 JWTs (RS256, key by `kid` from a cached JWKS) and, only when
//! `ENVIRONMENT=local`, tokens signed by the project's local development key (`whist dev token`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::{Environment, Settings};

/// The `kid` of the local development key.
pub const DEV_KEY_ID: &str = "whist-local-dev";
/// Issuer and audience of development tokens.
pub const DEV_ISSUER: &str = "https://whist.local/";
pub const DEV_AUDIENCE: &str = "whist-local";

/// A development-only key pair, committed on purpose: tokens it signs are refused unless `ENVIRONMENT=local`.
const DEV_SIGNING_KEY: &[u8] = include_bytes!("dev_signing_key.pem");
const DEV_VERIFYING_KEY: &[u8] = include_bytes!("dev_verifying_key.pem");

/// The shortest time between two JWKS fetches caused by unknown `kid`s once keys are known (a forged `kid` must
/// not make us hammer Auth0), and while none could be fetched yet.
const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
const FIRST_FETCH_INTERVAL: Duration = Duration::from_secs(1);
/// After a fetch that failed (the JWKS endpoint down or hanging), the next may come this soon: a failed fetch fetched
/// nothing, so it must not hold back the fetch that brings a rotated key once the endpoint is back for a whole
/// `REFETCH_INTERVAL`.
const FAILED_FETCH_INTERVAL: Duration = Duration::from_secs(2);

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub user_id: String,
    /// Whether the token has scope `admin` (a developer).
    pub is_admin: bool,
}

/// Why a token was refused. Every variant answers 401; the variant is for logs and metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not RS256")]
    WrongAlgorithm,
    #[error("no known key has the token's kid")]
    UnknownKey,
    #[error("the token's signature, issuer, audience or expiry is invalid: {0}")]
    Invalid(String),
    #[error("no token issuer is configured")]
    NotConfigured,
}

#[derive(Debug, Deserialize, Serialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    iss: String,
    aud: serde_json::Value,
}

struct Auth0 {
    jwks_url: String,
    issuer: Option<String>,
    audience: Option<String>,
    keys: RwLock<JwkSet>,
    fetches: std::sync::Mutex<FetchTimes>,
}

/// Before when no new fetch may start: while no key is known (`first`), and once keys are known, for an unknown
/// `kid` (`refetch`).
#[derive(Default)]
struct FetchTimes {
    first: Option<Instant>,
    refetch: Option<Instant>,
}

impl FetchTimes {
    fn not_before(&mut self, have_keys: bool) -> &mut Option<Instant> {
        if have_keys {
            &mut self.refetch
        } else {
            &mut self.first
        }
    }
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct TokenVerifier {
    auth0: Option<Arc<Auth0>>,
    dev_key: Option<Arc<DecodingKey>>,
    http: reqwest::Client,
}

impl TokenVerifier {
    /// A verifier for the configured Auth0 tenant, plus the development key when `ENVIRONMENT=local`.
    pub fn new(settings: &Settings) -> Self {
        let auth0 = settings.auth0.jwks_url.clone().map(|jwks_url| {
            Arc::new(Auth0 {
                jwks_url,
                issuer: settings.auth0.issuer.clone(),
                audience: settings.auth0.audience.clone(),
                keys: RwLock::new(JwkSet { keys: vec![] }),
                fetches: std::sync::Mutex::new(FetchTimes::default()),
            })
        });
        let dev_key = (settings.environment == Environment::Local)
            .then(|| DecodingKey::from_rsa_pem(DEV_VERIFYING_KEY).ok())
            .flatten()
            .map(Arc::new);
        crate::tls::ensure_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            auth0,
            dev_key,
            http,
        }
    }

    /// Checks a token and says whom it speaks for.
    ///
    /// # Errors
    /// Any failure to prove the token genuine, current and meant for us.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(AuthError::UnknownKey)?;
        if kid == DEV_KEY_ID {
            let key = self.dev_key.as_ref().ok_or(AuthError::UnknownKey)?;
            return check(token, key, Some(DEV_ISSUER), Some(DEV_AUDIENCE));
        }
        let auth0 = self.auth0.as_ref().ok_or(AuthError::NotConfigured)?;
        let key = match self.find_key(auth0, &kid).await {
            Some(key) => key,
            None => {
                self.refetch(auth0).await;
                self.find_key(auth0, &kid)
                    .await
                    .ok_or(AuthError::UnknownKey)?
            }
        };
        check(
            token,
            &key,
            auth0.issuer.as_deref(),
            auth0.audience.as_deref(),
        )
    }

    async fn find_key(&self, auth0: &Auth0, kid: &str) -> Option<DecodingKey> {
        let keys = auth0.keys.read().await;
        keys.find(kid)
            .and_then(|jwk| DecodingKey::from_jwk(jwk).ok())
    }

    /// Fetches the JWKS: the first time whenever asked (at most once a second), then again at most once per
    /// `REFETCH_INTERVAL`; on failure the cached keys stay, and the next fetch may come after
    /// `FAILED_FETCH_INTERVAL`.
    async fn refetch(&self, auth0: &Auth0) {
        let have_keys = !auth0.keys.read().await.keys.is_empty();
        let interval = if have_keys {
            REFETCH_INTERVAL
        } else {
            FIRST_FETCH_INTERVAL
        };
        {
            let Ok(mut fetches) = auth0.fetches.lock() else {
                return;
            };
            let now = Instant::now();
            let not_before = fetches.not_before(have_keys);
            if not_before.is_some_and(|at| now < at) {
                return;
            }
            *not_before = Some(now + interval);
        }
        let fetched = async {
            self.http
                .get(&auth0.jwks_url)
                .send()
                .await?
                .error_for_status()?
                .json::<JwkSet>()
                .await
        }
        .await;
        match fetched {
            Ok(keys) => {
                tracing::info!(keys = keys.keys.len(), "fetched the token signing keys");
                *auth0.keys.write().await = keys;
            }
            Err(error) => {
                tracing::warn!(error = %error, "could not fetch the token signing keys; keeping the cached ones");
                if let Ok(mut fetches) = auth0.fetches.lock() {
                    *fetches.not_before(have_keys) =
                        Some(Instant::now() + FAILED_FETCH_INTERVAL.min(interval));
                }
            }
        }
    }
}

fn check(
    token: &str,
    key: &DecodingKey,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<Principal, AuthError> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = 30;
    validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    match issuer {
        Some(issuer) => validation.set_issuer(&[issuer]),
        None => return Err(AuthError::NotConfigured),
    }
    match audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => return Err(AuthError::NotConfigured),
    }
    let data = jsonwebtoken::decode::<Claims>(token, key, &validation)
        .map_err(|error| AuthError::Invalid(error.to_string()))?;
    let scopes: HashSet<&str> = data
        .claims
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    if data.claims.sub.is_empty() {
        return Err(AuthError::Invalid("empty sub".to_string()));
    }
    Ok(Principal {
        user_id: data.claims.sub,
        is_admin: scopes.contains("admin"),
    })
}

/// A token signed by the local development key (`whist dev token`), valid for `lifetime`.
///
/// # Errors
/// The embedded key could not be read (it always can) or the token not signed.
pub fn dev_token(user_id: &str, admin: bool, lifetime: Duration) -> Result<String, AuthError> {
    let key = EncodingKey::from_rsa_pem(DEV_SIGNING_KEY).map_err(|_| AuthError::Malformed)?;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let claims = Claims {
        sub: user_id.to_string(),
        scope: Some(if admin { "openid admin" } else { "openid" }.to_string()),
        exp: now + lifetime.as_secs(),
        iat: Some(now),
        iss: DEV_ISSUER.to_string(),
        aud: serde_json::Value::String(DEV_AUDIENCE.to_string()),
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(DEV_KEY_ID.to_string());
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|error| AuthError::Invalid(error.to_string()))
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    header
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or(AuthError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    fn settings(environment: &str) -> Settings {
        let mut sources = Sources::default();
        sources
            .environment
            .insert("ENVIRONMENT".to_string(), environment.to_string());
        sources.environment.insert(
            "WHIST_TOKEN_KEYS".to_string(),
            "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
        );
        Settings::from_sources(&sources).expect("valid")
    }

    #[tokio::test]
    async fn a_dev_token_is_accepted_in_local() {
        let token = dev_token("dev-user", true, Duration::from_secs(60)).expect("signed");
        let principal = TokenVerifier::new(&settings("local"))
            .verify(&token)
            .await
            .expect("accepted");
        assert_eq!(
            principal,
            Principal {
                user_id: "dev-user".to_string(),
                is_admin: true
            }
        );
    }

    #[tokio::test]
    async fn a_dev_token_is_refused_outside_local() {
        let token = dev_token("dev-user", true, Duration::from_secs(60)).expect("signed");
        for environment in ["dev", "staging", "prod"] {
            let refused = TokenVerifier::new(&settings(environment))
                .verify(&token)
                .await;
            assert!(refused.is_err(), "{environment}");
        }
    }

    #[test]
    fn only_a_bearer_header_carries_a_token() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(bearer(None), Err(AuthError::Missing));
    }
}
