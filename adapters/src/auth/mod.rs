//! Checking bearer tokens: Auth0 JWTs (RS256, key by `kid` from a cached JWKS) and, only when
//! `ENVIRONMENT=local`, tokens signed by the project's local development key (`whist dev token`).
//!
//! # How the Auth0 signing keys are kept
//! The keys come from the tenant's JWKS and are cached for `JWKS_CACHE_TTL_S` (the TTL), counted from the start of
//! the fetch that brought them:
//! - **One fetch at a time.** At most one JWKS fetch is in flight. A request that needs keys (none cached yet, the
//!   cached ones expired, or a `kid` the cache does not know) waits for the fetch in flight instead of failing, and
//!   looks again once it has finished. The wait is bounded by the fetch's own timeout ([`JWKS_FETCH_TIMEOUT`]).
//! - **Refreshed in the background.** A request that finds its key in keys older than half the TTL starts a
//!   refresh and does not wait for it. Keys older than the TTL are never used, so a key the tenant removed is
//!   refused at the latest one TTL after its removal (about half a TTL under steady traffic).
//! - **Fail closed at expiry.** A failed fetch keeps the cached keys while they are younger than the TTL; from
//!   half the TTL on, refreshes are retried (at most every [`FAILED_FETCH_INTERVAL`], while requests arrive), so a
//!   JWKS outage shorter than half the TTL (five minutes by default) goes unnoticed by users. Keys older than the
//!   TTL are never used: once they expire without a successful refresh, every Auth0 token is refused (401,
//!   logged as a warning) until a fetch succeeds. We prefer refusing sign-ins during a long Auth0 outage to
//!   trusting, for an unbounded time, a key the tenant may have revoked.
//! - **No hammering.** A `kid` the cache does not know makes us fetch again at most once per
//!   [`UNKNOWN_KID_REFETCH_INTERVAL`] (a forged `kid` must not make us hammer Auth0), and after a failed fetch
//!   no new fetch starts for [`FAILED_FETCH_INTERVAL`]; requests that would need one in between are refused at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Environment, Settings};

mod verified;
use verified::VerifiedTokens;
pub use verified::{MOST_REMEMBERED, REMEMBERED_FOR};

/// The `kid` of the local development key.
pub const DEV_KEY_ID: &str = "whist-local-dev";
/// Issuer and audience of development tokens.
pub const DEV_ISSUER: &str = "https://whist.local/";
pub const DEV_AUDIENCE: &str = "whist-local";

/// A development-only key pair, committed on purpose: tokens it signs are refused unless `ENVIRONMENT=local`.
const DEV_SIGNING_KEY: &[u8] = include_bytes!("dev_signing_key.pem");
const DEV_VERIFYING_KEY: &[u8] = include_bytes!("dev_verifying_key.pem");

/// How long one JWKS fetch may take, connection included: a hanging JWKS endpoint holds a request that waits for
/// keys no longer than this (twice this when a second fetch had to follow the one in flight).
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time between two JWKS fetches caused by `kid`s the cache does not know: a forged `kid` must not
/// make us hammer Auth0.
pub const UNKNOWN_KID_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// After a fetch that failed (the JWKS endpoint down or hanging), the next may start this soon: a failed fetch
/// fetched nothing, so it must not hold back for long the fetch that brings a rotated key once the endpoint is back.
pub const FAILED_FETCH_INTERVAL: Duration = Duration::from_secs(2);
/// How many seconds `exp` and `nbf` may be off, for clocks that disagree a little.
const CLOCK_LEEWAY_SECONDS: u64 = 30;

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
    #[error("no current token signing keys: the JWKS could not be fetched")]
    KeysUnavailable,
    #[error("the token's signature, issuer, audience, expiry or not-before is invalid: {0}")]
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

/// The tenant's signing keys, by `kid`, ready to check signatures with.
type KeysById = HashMap<String, Arc<DecodingKey>>;

/// The Auth0 tenant we take tokens from, and the cache of its signing keys.
struct Auth0 {
    jwks_url: String,
    issuer: Option<String>,
    audience: Option<String>,
    cache_ttl: Duration,
    http: reqwest::Client,
    cache: Mutex<KeyCache>,
    /// The number of the last fetch that finished (see [`KeyCache::fetches_finished`]), for requests waiting on it.
    fetches_finished: watch::Sender<u64>,
}

/// The cached keys and the bookkeeping of the fetches that bring them. Fetches are numbered from 1 in the order
/// they start; a request waiting for fetch `n` waits until `fetches_finished >= n`.
#[derive(Default)]
struct KeyCache {
    keys: Arc<KeysById>,
    /// When the fetch that brought `keys` started; `None` until a fetch succeeds.
    fetched_at: Option<Instant>,
    /// Whether the fetch task runs (it runs one fetch at a time, and a follow-up when asked).
    fetch_in_flight: bool,
    /// Whether a fetch must follow the one in flight, because a request needs keys newer than its start.
    follow_up_wanted: bool,
    fetches_started: u64,
    fetches_finished: u64,
    /// No fetch may start before then (set after a failed fetch).
    no_fetch_before: Option<Instant>,
    /// No fetch for an unknown `kid` may start before then.
    no_unknown_kid_fetch_before: Option<Instant>,
    /// Whether the expiry of the keys without a successful refresh has been logged (it is logged once).
    expiry_logged: bool,
}

/// What a request does about the keys after looking in the cache.
enum KeyLookup {
    Found(Arc<DecodingKey>),
    Refused(AuthError),
    /// Wait until this fetch has finished, then look again.
    WaitFor(u64),
}

impl KeyCache {
    /// The keys, while they are younger than `ttl`.
    fn current_keys(&self, now: Instant, ttl: Duration) -> Option<&Arc<KeysById>> {
        self.fetched_at
            .filter(|fetched_at| now.saturating_duration_since(*fetched_at) < ttl)
            .map(|_| &self.keys)
    }

    fn may_start_fetch(&self, now: Instant) -> bool {
        self.no_fetch_before.is_none_or(|at| now >= at)
    }

    fn may_fetch_for_unknown_kid(&self, now: Instant) -> bool {
        self.no_unknown_kid_fetch_before.is_none_or(|at| now >= at)
    }

    /// The number of the last fetch that will run, counting a follow-up asked for.
    fn last_scheduled_fetch(&self) -> u64 {
        self.fetches_started + u64::from(self.follow_up_wanted)
    }

    /// Starts a fetch now if none is in flight and none is held back, and returns its number; the caller then
    /// spawns the fetch task.
    fn start_fetch_if_allowed(&mut self, now: Instant) -> Option<u64> {
        if self.fetch_in_flight || !self.may_start_fetch(now) {
            return None;
        }
        self.fetch_in_flight = true;
        self.fetches_started += 1;
        Some(self.fetches_started)
    }

    /// The number of a fetch that starts no earlier than now: the next one if a fetch is in flight (it may have
    /// started before the change we are looking for), else one started now. The second value says whether the
    /// fetch task must be spawned; `None` when no fetch may start yet.
    fn fetch_starting_from_now(&mut self, now: Instant) -> Option<(u64, bool)> {
        if self.fetch_in_flight {
            self.follow_up_wanted = true;
            return Some((self.fetches_started + 1, false));
        }
        self.start_fetch_if_allowed(now).map(|fetch| (fetch, true))
    }

    /// Decides what a request with `kid` does: use a cached key, wait for a fetch, or be refused. The second
    /// value says whether the fetch task must be spawned.
    fn look_up(&mut self, kid: &str, now: Instant, ttl: Duration) -> (KeyLookup, bool) {
        if let Some(keys) = self.current_keys(now, ttl) {
            if let Some(key) = keys.get(kid) {
                let key = key.clone();
                // Keys past half their life are refreshed in the background: this request does not wait.
                let refresh_due = self
                    .fetched_at
                    .is_some_and(|fetched_at| now.saturating_duration_since(fetched_at) >= ttl / 2);
                let spawn = refresh_due && self.start_fetch_if_allowed(now).is_some();
                return (KeyLookup::Found(key), spawn);
            }
            // A kid we do not know: the tenant may have rotated its keys since our fetch, or the kid is forged.
            if self.may_fetch_for_unknown_kid(now)
                && (self.fetch_in_flight || self.may_start_fetch(now))
            {
                self.no_unknown_kid_fetch_before = Some(now + UNKNOWN_KID_REFETCH_INTERVAL);
                if let Some((fetch, spawn)) = self.fetch_starting_from_now(now) {
                    return (KeyLookup::WaitFor(fetch), spawn);
                }
            }
            if self.fetch_in_flight {
                return (KeyLookup::WaitFor(self.last_scheduled_fetch()), false);
            }
            return (KeyLookup::Refused(AuthError::UnknownKey), false);
        }
        // No current keys: none fetched yet, or they expired. Whichever fetch finishes next settles it.
        if self.fetched_at.is_some() && !self.expiry_logged {
            self.expiry_logged = true;
            tracing::warn!(
                "the token signing keys expired before a refresh succeeded; Auth0 tokens are refused until the \
                 JWKS can be fetched"
            );
        }
        if self.fetch_in_flight {
            return (KeyLookup::WaitFor(self.last_scheduled_fetch()), false);
        }
        match self.start_fetch_if_allowed(now) {
            Some(fetch) => (KeyLookup::WaitFor(fetch), true),
            None => (KeyLookup::Refused(AuthError::KeysUnavailable), false),
        }
    }

    /// Records the outcome of the fetch that started at `started_at`; whether the fetch task must fetch again.
    fn finish_fetch(&mut self, started_at: Instant, fetched: Option<KeysById>) -> bool {
        let succeeded = fetched.is_some();
        match fetched {
            Some(keys) => {
                self.keys = Arc::new(keys);
                self.fetched_at = Some(started_at);
                self.no_fetch_before = None;
                self.expiry_logged = false;
            }
            None => {
                let retry_at = Instant::now() + FAILED_FETCH_INTERVAL;
                self.no_fetch_before = Some(retry_at);
                // A failed fetch brought no rotated key: the next unknown kid may try again soon.
                self.no_unknown_kid_fetch_before = Some(
                    self.no_unknown_kid_fetch_before
                        .map_or(retry_at, |at| at.min(retry_at)),
                );
            }
        }
        let follow_up = std::mem::take(&mut self.follow_up_wanted);
        if follow_up && succeeded {
            // The follow-up starts at once; the fetch that just finished is done.
            self.fetches_finished = self.fetches_started;
            self.fetches_started += 1;
            return true;
        }
        if follow_up {
            // After a failure the follow-up would fail as well, and would fetch sooner than
            // `FAILED_FETCH_INTERVAL` allows: it counts as finished without running.
            self.fetches_started += 1;
        }
        self.fetches_finished = self.fetches_started;
        self.fetch_in_flight = false;
        false
    }
}

impl Auth0 {
    fn cache(&self) -> MutexGuard<'_, KeyCache> {
        // The cache is consistent after every critical section (none of them panics), so a poisoned lock is safe
        // to take over.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key for `kid`, fetching the JWKS first when needed (see the module documentation).
    ///
    /// # Errors
    /// [`AuthError::UnknownKey`] when the current keys have no such `kid`, [`AuthError::KeysUnavailable`] when
    /// there are no current keys (the JWKS could not be fetched).
    async fn key_for(self: &Arc<Self>, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        let (lookup, spawn) = self.cache().look_up(kid, Instant::now(), self.cache_ttl);
        if spawn {
            self.spawn_fetches();
        }
        let fetch = match lookup {
            KeyLookup::Found(key) => return Ok(key),
            KeyLookup::Refused(error) => return Err(error),
            KeyLookup::WaitFor(fetch) => fetch,
        };
        let mut finished = self.fetches_finished.subscribe();
        // The fetch task bounds each fetch by `JWKS_FETCH_TIMEOUT`, and runs at most one follow-up; the bound here
        // only guards against a fetch task that is gone.
        let waited = tokio::time::timeout(
            2 * JWKS_FETCH_TIMEOUT + Duration::from_secs(1),
            finished.wait_for(|finished| *finished >= fetch),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            tracing::warn!(fetch, "gave up waiting for a JWKS fetch");
        }
        let cache = self.cache();
        match cache.current_keys(Instant::now(), self.cache_ttl) {
            Some(keys) => keys.get(kid).cloned().ok_or(AuthError::UnknownKey),
            None => Err(AuthError::KeysUnavailable),
        }
    }

    /// Runs the fetch task: one fetch, and another right after it while a follow-up is wanted. It runs apart from
    /// the requests that wait for it, so that a request given up by its client does not abandon the fetch.
    fn spawn_fetches(self: &Arc<Self>) {
        let auth0 = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let started_at = Instant::now();
                let fetched = auth0.fetch_keys().await;
                let (again, finished) = {
                    let mut cache = auth0.cache();
                    let again = cache.finish_fetch(started_at, fetched);
                    (again, cache.fetches_finished)
                };
                auth0.fetches_finished.send_replace(finished);
                if !again {
                    break;
                }
            }
        });
    }

    /// One fetch of the JWKS; its RSA keys by `kid`, or `None` (logged) when it failed.
    async fn fetch_keys(&self) -> Option<KeysById> {
        let fetched = tokio::time::timeout(JWKS_FETCH_TIMEOUT, async {
            self.http
                .get(&self.jwks_url)
                .send()
                .await?
                .error_for_status()?
                .json::<JwkSet>()
                .await
        })
        .await;
        match fetched {
            Ok(Ok(set)) => {
                let keys = rsa_keys_by_id(&set);
                tracing::info!(
                    keys = keys.len(),
                    published = set.keys.len(),
                    "fetched the token signing keys"
                );
                Some(keys)
            }
            Ok(Err(error)) => {
                let error = crate::tls::error_chain(&error);
                tracing::warn!(
                    error,
                    "could not fetch the token signing keys; keeping the cached ones"
                );
                None
            }
            Err(_) => {
                tracing::warn!(
                    timeout_s = JWKS_FETCH_TIMEOUT.as_secs(),
                    "the JWKS endpoint did not answer in time; keeping the cached token signing keys"
                );
                None
            }
        }
    }
}

/// The RSA keys of a JWKS by `kid` (the first of a `kid` wins); keys of another type, or without a `kid`, cannot
/// check an RS256 token of ours and are left out.
fn rsa_keys_by_id(set: &JwkSet) -> KeysById {
    let mut keys = KeysById::new();
    for jwk in &set.keys {
        let (Some(kid), AlgorithmParameters::RSA(_)) = (&jwk.common.key_id, &jwk.algorithm) else {
            continue;
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => {
                keys.entry(kid.clone()).or_insert_with(|| Arc::new(key));
            }
            Err(error) => {
                tracing::warn!(kid, error = %error, "a published signing key is unusable")
            }
        }
    }
    keys
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct TokenVerifier {
    auth0: Option<Arc<Auth0>>,
    dev_key: Option<Arc<DecodingKey>>,
    /// Tokens that passed every check, remembered with the key that checked them (see `verified`).
    verified: VerifiedTokens,
}

impl TokenVerifier {
    /// A verifier for the configured Auth0 tenant (keys cached for `settings.jwks_cache_ttl`), plus the
    /// development key when `ENVIRONMENT=local`.
    pub fn new(settings: &Settings) -> Self {
        crate::tls::ensure_crypto_provider();
        let auth0 = settings.auth0.jwks_url.clone().map(|jwks_url| {
            // Should the builder fail, the default client has no timeout (`fetch_keys` bounds every fetch itself)
            // and trusts only the public roots.
            let mut http = reqwest::Client::builder().timeout(JWKS_FETCH_TIMEOUT);
            if let Some(authorities) = &settings.auth0.ca {
                http = http.use_preconfigured_tls(crate::tls::client_config_trusting(authorities));
            }
            let http = http.build().unwrap_or_default();
            Arc::new(Auth0 {
                jwks_url,
                issuer: settings.auth0.issuer.clone(),
                audience: settings.auth0.audience.clone(),
                cache_ttl: settings.jwks_cache_ttl,
                http,
                cache: Mutex::new(KeyCache::default()),
                fetches_finished: watch::Sender::new(0),
            })
        });
        let dev_key = (settings.environment == Environment::Local)
            .then(|| DecodingKey::from_rsa_pem(DEV_VERIFYING_KEY).ok())
            .flatten()
            .map(Arc::new);
        Self {
            auth0,
            dev_key,
            verified: VerifiedTokens::default(),
        }
    }

    /// Checks a token and says whom it speaks for: an RS256 signature by a key of the tenant's JWKS (found by
    /// `kid`, waiting for a fetch when the cache needs one), the issuer, the audience, `exp` and `nbf` (with 30 s
    /// of leeway) and a non-empty `sub`. A token that passed them all is remembered, with the key that checked it,
    /// until its `exp` (at most [`REMEMBERED_FOR`]): the same token again costs a lookup, not a signature check,
    /// while the verifier would still check it with that same key (`verified`).
    ///
    /// # Errors
    /// Any failure to prove the token genuine, current and meant for us, including having no current signing keys
    /// because the JWKS could not be fetched.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(AuthError::UnknownKey)?;
        let (key, issuer, audience) = if kid == DEV_KEY_ID {
            let key = self.dev_key.as_ref().ok_or(AuthError::UnknownKey)?;
            (key.clone(), Some(DEV_ISSUER), Some(DEV_AUDIENCE))
        } else {
            let auth0 = self.auth0.as_ref().ok_or(AuthError::NotConfigured)?;
            (
                auth0.key_for(&kid).await?,
                auth0.issuer.as_deref(),
                auth0.audience.as_deref(),
            )
        };
        // The key is looked up first, so a token remembered with a key the verifier no longer uses is checked
        // again (and refused, should the key be gone).
        // The clock the full check reads.
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(principal) = self.verified.get(token, &key, now) {
            return Ok(principal);
        }
        let (principal, exp) = check(token, &key, issuer, audience)?;
        self.verified.remember(
            token,
            &key,
            &principal,
            now,
            exp.saturating_add(CLOCK_LEEWAY_SECONDS),
        );
        Ok(principal)
    }
}

/// Checks `token` in full; whom it speaks for and its `exp`.
fn check(
    token: &str,
    key: &DecodingKey,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<(Principal, u64), AuthError> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = CLOCK_LEEWAY_SECONDS;
    // `nbf` is optional (Auth0 does not set it), but a token that says it is not valid yet is not.
    validation.validate_nbf = true;
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
    let principal = Principal {
        user_id: data.claims.sub,
        is_admin: scopes.contains("admin"),
    };
    Ok((principal, data.claims.exp))
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

    // -----------------------------------------------------------------------------------------------------------
    // The Auth0 key cache, against a JWKS served on loopback by the test.
    // -----------------------------------------------------------------------------------------------------------

    const TENANT_KID: &str = "tenant-test";
    const TENANT_ISSUER: &str = "https://whist-unit.auth0.example/";
    const TENANT_AUDIENCE: &str = "https://api.whist.unit";
    /// The modulus of `dev_verifying_key.pem`, base64url (`openssl rsa -pubin -in dev_verifying_key.pem -modulus`):
    /// the tests publish the committed development key pair under another `kid`, as a tenant would publish its key.
    const DEV_KEY_MODULUS: &str = "loDw7IwU-TdrTGzmaNkVlv3OVSLK_HHEaTNK8rQQUf1lZzv8qNGTxp-koJ7sVCy7kHVw9eVj4TM0dg5HXKJwRo\
        OEAPymDBjth919Jq53V1FuJLQbEiy6-brK2CGN_M2s5aknp1SAx4aOtizUYtIfbTexWguiTsqML25i6fgLuq_fGW5qIbdh1jMRjxrRwfO1T9oY\
        WZ3GFhGec9_ZkFvPF3cVIcTgjZaUADOMcNa8fqdiNd9GM0tno7san4_YFqJ-k8Cp5dt2VlUciGsSoilLyLeP28_Q0z7ZiAM6yiau0DoMx_6D_A\
        AsHrqlr2sEzdCg6uc7UPFXIxQatlBqUvdmZQ";

    /// What the fake tenant's JWKS endpoint does; the test changes it as it goes.
    struct FakeJwks {
        document: Mutex<serde_json::Value>,
        delay: Mutex<Duration>,
        failing: std::sync::atomic::AtomicBool,
        fetches: std::sync::atomic::AtomicUsize,
    }

    impl FakeJwks {
        fn fetches(&self) -> usize {
            self.fetches.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn publish(&self, kids: &[&str]) {
            let keys: Vec<serde_json::Value> = kids
                .iter()
                .map(|kid| {
                    serde_json::json!({
                        "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": DEV_KEY_MODULUS, "e": "AQAB",
                    })
                })
                .collect();
            *self.document.lock().expect("lock") = serde_json::json!({ "keys": keys });
        }

        fn set_delay(&self, delay: Duration) {
            *self.delay.lock().expect("lock") = delay;
        }
    }

    #[poem::handler]
    async fn fake_jwks_document(
        poem::web::Data(fake): poem::web::Data<&Arc<FakeJwks>>,
    ) -> poem::Response {
        fake.fetches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let delay = *fake.delay.lock().expect("lock");
        tokio::time::sleep(delay).await;
        if fake.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return poem::Response::builder()
                .status(poem::http::StatusCode::INTERNAL_SERVER_ERROR)
                .finish();
        }
        let document = fake.document.lock().expect("lock").clone();
        poem::Response::builder()
            .content_type("application/json")
            .body(document.to_string())
    }

    /// A JWKS endpoint on loopback publishing the tenant key, and a verifier for it with keys cached for `ttl`.
    async fn verifier_with_fake_tenant(ttl_seconds: u64) -> (TokenVerifier, Arc<FakeJwks>) {
        use poem::listener::{Acceptor, Listener};
        use poem::EndpointExt;
        let fake = Arc::new(FakeJwks {
            document: Mutex::new(serde_json::Value::Null),
            delay: Mutex::new(Duration::ZERO),
            failing: std::sync::atomic::AtomicBool::new(false),
            fetches: std::sync::atomic::AtomicUsize::new(0),
        });
        fake.publish(&[TENANT_KID]);
        let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("a loopback port");
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|address| address.as_socket_addr().map(|socket| socket.port()))
            .expect("a port");
        let app = poem::Route::new()
            .at("/jwks.json", poem::get(fake_jwks_document))
            .data(fake.clone());
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
        });
        let mut sources = Sources::default();
        for (key, value) in [
            ("ENVIRONMENT", "prod".to_string()),
            (
                "WHIST_TOKEN_KEYS",
                "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
            ),
            (
                "AUTH0_JWKS_URL",
                format!("http://127.0.0.1:{port}/jwks.json"),
            ),
            ("AUTH0_ISSUER", TENANT_ISSUER.to_string()),
            ("AUTH0_AUDIENCE", TENANT_AUDIENCE.to_string()),
            ("JWKS_CACHE_TTL_S", ttl_seconds.to_string()),
        ] {
            sources.environment.insert(key.to_string(), value);
        }
        let settings = Settings::from_sources(&sources).expect("valid");
        (TokenVerifier::new(&settings), fake)
    }

    /// A token of the fake tenant signed with the key published as `kid`, with `claims` added to valid ones.
    fn tenant_token(kid: &str, extra_claims: serde_json::Value) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut claims = serde_json::json!({
            "sub": "auth0|unit", "scope": "openid", "iss": TENANT_ISSUER, "aud": TENANT_AUDIENCE,
            "iat": now, "exp": now + 600,
        });
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra_claims.as_object()) {
            claims.extend(extra.clone());
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_string());
        let key = EncodingKey::from_rsa_pem(DEV_SIGNING_KEY).expect("the development key");
        jsonwebtoken::encode(&header, &claims, &key).expect("signed")
    }

    #[tokio::test]
    async fn concurrent_requests_on_a_cold_cache_share_one_fetch_and_are_all_accepted() {
        let (verifier, fake) = verifier_with_fake_tenant(600).await;
        fake.set_delay(Duration::from_millis(300));
        let token = tenant_token(TENANT_KID, serde_json::json!({}));
        let verifications = (0..32).map(|_| verifier.verify(&token));
        let outcomes = futures::future::join_all(verifications).await;
        let accepted = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        assert_eq!(accepted, 32, "{outcomes:?}");
        assert_eq!(fake.fetches(), 1, "one fetch for all of them");
    }

    #[tokio::test]
    async fn a_forged_kid_fetches_the_jwks_again_at_most_once_per_interval() {
        let (verifier, fake) = verifier_with_fake_tenant(600).await;
        let good = tenant_token(TENANT_KID, serde_json::json!({}));
        assert!(verifier.verify(&good).await.is_ok());
        let forged = tenant_token("forged-kid", serde_json::json!({}));
        for _ in 0..20 {
            assert_eq!(verifier.verify(&forged).await, Err(AuthError::UnknownKey));
        }
        assert_eq!(
            fake.fetches(),
            2,
            "the first fetch and one for the unknown kid"
        );
    }

    #[tokio::test]
    async fn requests_with_a_rotated_kid_wait_for_one_fetch_and_are_all_accepted() {
        let (verifier, fake) = verifier_with_fake_tenant(600).await;
        assert!(verifier
            .verify(&tenant_token(TENANT_KID, serde_json::json!({})))
            .await
            .is_ok());
        fake.publish(&[TENANT_KID, "tenant-rotated"]);
        fake.set_delay(Duration::from_millis(300));
        let rotated = tenant_token("tenant-rotated", serde_json::json!({}));
        let outcomes = futures::future::join_all((0..16).map(|_| verifier.verify(&rotated))).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(fake.fetches(), 2);
    }

    #[tokio::test]
    async fn keys_past_half_their_life_are_refreshed_without_making_the_request_wait() {
        let (verifier, fake) = verifier_with_fake_tenant(2).await;
        let token = tenant_token(TENANT_KID, serde_json::json!({}));
        assert!(verifier.verify(&token).await.is_ok());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        fake.set_delay(Duration::from_millis(700));
        let asked = Instant::now();
        assert!(verifier.verify(&token).await.is_ok());
        assert!(
            asked.elapsed() < Duration::from_millis(300),
            "answered from the cache in {:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(fake.fetches(), 2, "a refresh ran in the background");
    }

    #[tokio::test]
    async fn expired_keys_are_not_used_when_the_refresh_fails_and_are_used_again_once_it_succeeds()
    {
        let (verifier, fake) = verifier_with_fake_tenant(1).await;
        let token = tenant_token(TENANT_KID, serde_json::json!({}));
        assert!(verifier.verify(&token).await.is_ok());
        fake.failing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            verifier.verify(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        fake.failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(FAILED_FETCH_INTERVAL).await;
        assert!(verifier.verify(&token).await.is_ok());
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_the_tenant_drops_its_key() {
        let (verifier, fake) = verifier_with_fake_tenant(2).await;
        let token = tenant_token(TENANT_KID, serde_json::json!({}));
        assert!(verifier.verify(&token).await.is_ok());
        assert_eq!(verifier.verified.len(), 1, "remembered");
        assert!(verifier.verify(&token).await.is_ok());
        fake.publish(&["tenant-next"]);
        // Past half the keys' life the next request starts a refresh, which brings keys without the token's kid.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(verifier.verify(&token).await.is_ok(), "the keys in hand");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(fake.fetches(), 2, "the refresh ran");
        assert_eq!(verifier.verify(&token).await, Err(AuthError::UnknownKey));
    }

    #[tokio::test]
    async fn a_token_that_differs_from_a_remembered_one_is_checked_in_full() {
        let (verifier, _fake) = verifier_with_fake_tenant(600).await;
        let token = tenant_token(TENANT_KID, serde_json::json!({}));
        assert!(verifier.verify(&token).await.is_ok());
        // The same header and claims with another signature, and the same signature with other claims.
        let (signed, signature) = token.rsplit_once('.').expect("three parts");
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        let forged_signature = format!("{signed}.{flipped}{}", &signature[1..]);
        assert!(matches!(
            verifier.verify(&forged_signature).await,
            Err(AuthError::Invalid(_))
        ));
        let other = tenant_token(
            TENANT_KID,
            serde_json::json!({ "sub": "auth0|someone-else" }),
        );
        let (other_signed, _) = other.rsplit_once('.').expect("three parts");
        let forged_claims = format!("{other_signed}.{signature}");
        assert!(matches!(
            verifier.verify(&forged_claims).await,
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(verifier.verified.len(), 1, "refusals are not remembered");
    }

    #[tokio::test]
    async fn a_token_not_valid_yet_is_refused_and_one_within_the_clock_leeway_is_accepted() {
        let (verifier, _fake) = verifier_with_fake_tenant(600).await;
        let now = chrono::Utc::now().timestamp();
        let not_yet = tenant_token(TENANT_KID, serde_json::json!({ "nbf": now + 120 }));
        assert!(matches!(
            verifier.verify(&not_yet).await,
            Err(AuthError::Invalid(_))
        ));
        let within_leeway = tenant_token(TENANT_KID, serde_json::json!({ "nbf": now + 10 }));
        assert!(verifier.verify(&within_leeway).await.is_ok());
    }

    #[test]
    fn an_unknown_kid_while_a_fetch_is_in_flight_asks_for_a_fetch_that_starts_after_it() {
        let now = Instant::now();
        let ttl = Duration::from_secs(600);
        let mut cache = KeyCache {
            fetched_at: Some(now),
            ..KeyCache::default()
        };
        assert_eq!(cache.start_fetch_if_allowed(now), Some(1));
        let (lookup, spawn) = cache.look_up("rotated", now, ttl);
        assert!(matches!(lookup, KeyLookup::WaitFor(2)));
        assert!(!spawn, "the fetch task in flight runs the follow-up");
        // The fetch in flight succeeds: the follow-up starts at once.
        assert!(cache.finish_fetch(now, Some(KeysById::new())));
        assert_eq!(cache.fetches_finished, 1);
        assert!(!cache.finish_fetch(now, Some(KeysById::new())));
        assert_eq!(cache.fetches_finished, 2);
        assert!(!cache.fetch_in_flight);
    }

    #[test]
    fn after_a_failed_fetch_no_fetch_starts_until_the_failed_fetch_interval_has_passed() {
        let now = Instant::now();
        let ttl = Duration::from_secs(600);
        let mut cache = KeyCache::default();
        let (lookup, spawn) = cache.look_up(TENANT_KID, now, ttl);
        assert!(matches!(lookup, KeyLookup::WaitFor(1)) && spawn);
        assert!(!cache.finish_fetch(now, None));
        let (lookup, spawn) = cache.look_up(TENANT_KID, Instant::now(), ttl);
        assert!(matches!(lookup, KeyLookup::Refused(AuthError::KeysUnavailable)) && !spawn);
        let later = Instant::now() + FAILED_FETCH_INTERVAL;
        let (lookup, spawn) = cache.look_up(TENANT_KID, later, ttl);
        assert!(matches!(lookup, KeyLookup::WaitFor(2)) && spawn);
    }
}
