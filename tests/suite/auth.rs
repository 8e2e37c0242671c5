//! Auth0 tokens: RS256 only, key by `kid` from a JWKS served on loopback with keys this test makes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use poem::listener::AcceptorExt;
use poem::{handler, web::Data, EndpointExt, Route};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use whist_adapters::tls::{Authority, ServerIdentity};
use whist_tests::{free_port, spawn_app_with, ChildProcess, TestDatabase};

pub(crate) const ISSUER: &str = "https://whist-test.auth0.example/";
pub(crate) const AUDIENCE: &str = "https://api.whist.test";

/// An RSA key pair as a tenant publishes it (the JWK) and signs with it (the private PEM).
pub(crate) struct TestKey {
    pub(crate) kid: String,
    private_pem: String,
    pub(crate) jwk: serde_json::Value,
    public_pem: String,
}

fn make_key(kid: &str) -> TestKey {
    let mut rng = rsa::rand_core::OsRng;
    let private = RsaPrivateKey::new(&mut rng, 2048).expect("an RSA key");
    let public = private.to_public_key();
    let encode = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    TestKey {
        kid: kid.to_string(),
        private_pem: private
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .expect("pem")
            .to_string(),
        public_pem: rsa::pkcs8::EncodePublicKey::to_public_key_pem(
            &public,
            rsa::pkcs8::LineEnding::LF,
        )
        .expect("pem"),
        jwk: serde_json::json!({
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
            "n": encode(public.n().to_bytes_be()),
            "e": encode(public.e().to_bytes_be()),
        }),
    }
}

/// The keys the tenant publishes, and one an attacker made.
pub(crate) fn keys() -> &'static (TestKey, TestKey, TestKey) {
    static KEYS: OnceLock<(TestKey, TestKey, TestKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            make_key("tenant-1"),
            make_key("tenant-2"),
            make_key("tenant-1"),
        )
    })
}

/// How the loopback JWKS endpoint behaves: how long it takes to answer, and how many fetches it has seen.
#[derive(Default)]
pub(crate) struct JwksEndpoint {
    delay: std::sync::Mutex<Duration>,
    fetches: AtomicUsize,
}

impl JwksEndpoint {
    /// The fetches so far.
    pub(crate) fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[handler]
async fn jwks(
    Data(published): Data<&Arc<std::sync::Mutex<serde_json::Value>>>,
    Data(endpoint): Data<&Arc<JwksEndpoint>>,
) -> poem::web::Json<serde_json::Value> {
    endpoint.fetches.fetch_add(1, Ordering::SeqCst);
    let delay = *endpoint.delay.lock().expect("lock");
    tokio::time::sleep(delay).await;
    poem::web::Json(published.lock().expect("lock").clone())
}

/// Serves a JWKS on loopback; returns its URL and the document it serves (changeable).
pub(crate) async fn serve_jwks(
    keys: Vec<serde_json::Value>,
) -> (
    String,
    Arc<std::sync::Mutex<serde_json::Value>>,
    tokio::task::JoinHandle<()>,
) {
    let (url, published, _, server) = serve_jwks_answering_after(keys, Duration::ZERO).await;
    (url, published, server)
}

/// As [`serve_jwks`], answering each fetch after `delay`; also returns the endpoint's fetch count.
pub(crate) async fn serve_jwks_answering_after(
    keys: Vec<serde_json::Value>,
    delay: Duration,
) -> (
    String,
    Arc<std::sync::Mutex<serde_json::Value>>,
    Arc<JwksEndpoint>,
    tokio::task::JoinHandle<()>,
) {
    serve_jwks_with(keys, delay, None).await
}

/// As [`serve_jwks_answering_after`], over HTTPS with `tls` when given.
pub(crate) async fn serve_jwks_with(
    keys: Vec<serde_json::Value>,
    delay: Duration,
    tls: Option<&ServerIdentity>,
) -> (
    String,
    Arc<std::sync::Mutex<serde_json::Value>>,
    Arc<JwksEndpoint>,
    tokio::task::JoinHandle<()>,
) {
    let published = Arc::new(std::sync::Mutex::new(serde_json::json!({ "keys": keys })));
    let endpoint = Arc::new(JwksEndpoint {
        delay: std::sync::Mutex::new(delay),
        fetches: AtomicUsize::new(0),
    });
    let (acceptor, port, scheme) = match tls {
        Some(identity) => {
            let (acceptor, port) = whist_tests::loopback_tls_acceptor(identity).await;
            (acceptor, port, "https")
        }
        None => {
            let (acceptor, port) = whist_tests::loopback_acceptor().await;
            (acceptor.boxed(), port, "http")
        }
    };
    let app = Route::new()
        .at("/.well-known/jwks.json", poem::get(jwks))
        .data(published.clone())
        .data(endpoint.clone());
    let server = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
    });
    (
        format!("{scheme}://127.0.0.1:{port}/.well-known/jwks.json"),
        published,
        endpoint,
        server,
    )
}

/// Claims of a token for `sub`, expiring in `expires_in` seconds.
pub(crate) fn claims(
    sub: &str,
    scope: &str,
    issuer: &str,
    audience: &str,
    expires_in: i64,
) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    serde_json::json!({
        "sub": sub,
        "scope": scope,
        "iss": issuer,
        "aud": audience,
        "iat": now,
        "exp": now + expires_in,
    })
}

/// An RS256 token signed with `key`, naming its kid.
pub(crate) fn sign(key: &TestKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).expect("key"),
    )
    .expect("signed")
}

/// `claims` with `nbf` (not before) `seconds` from now.
pub(crate) fn not_valid_for(claims: &serde_json::Value, seconds: i64) -> serde_json::Value {
    let mut claims = claims.clone();
    claims["nbf"] = serde_json::json!(chrono::Utc::now().timestamp() + seconds);
    claims
}

fn unsigned(kid: &str, claims: &serde_json::Value) -> String {
    let encode = |value: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    format!(
        "{}.{}.",
        encode(&serde_json::json!({ "alg": "none", "typ": "JWT", "kid": kid })),
        encode(claims)
    )
}

/// A server on a fresh embedded store that takes Auth0 tokens checked against the JWKS at `jwks_url`.
pub(crate) async fn app_with_auth0(
    jwks_url: &str,
    environment: &str,
) -> (TestDatabase, whist_tests::TestApp) {
    app_with_auth0_caching_keys_for(jwks_url, environment, None).await
}

/// As [`app_with_auth0`], keeping fetched signing keys for `jwks_cache_ttl` (`JWKS_CACHE_TTL_S`) when given.
pub(crate) async fn app_with_auth0_caching_keys_for(
    jwks_url: &str,
    environment: &str,
    jwks_cache_ttl: Option<Duration>,
) -> (TestDatabase, whist_tests::TestApp) {
    let database = TestDatabase::sqlite();
    let mut settings = auth0_settings(&database, jwks_url, environment);
    if let Some(ttl) = jwks_cache_ttl {
        settings.jwks_cache_ttl = ttl;
    }
    let app = spawn_app_with(&database, settings).await;
    (database, app)
}

/// Settings that take Auth0 tokens checked against the JWKS at `jwks_url`.
fn auth0_settings(
    database: &TestDatabase,
    jwks_url: &str,
    environment: &str,
) -> whist_adapters::config::Settings {
    let mut settings = database.settings();
    settings.auth0.jwks_url = Some(jwks_url.to_string());
    settings.auth0.issuer = Some(ISSUER.to_string());
    settings.auth0.audience = Some(AUDIENCE.to_string());
    settings.environment = match environment {
        "prod" => whist_adapters::config::Environment::Prod,
        _ => whist_adapters::config::Environment::Local,
    };
    settings
}

/// The status of `GET /mandelbox/{unknown id}` for `token`: 404 for a valid token, 401 for an invalid one.
pub(crate) async fn regions_status(app: &whist_tests::TestApp, token: &str) -> u16 {
    // GET /mandelbox/{id} needs a user; an unknown id answers 404 to a valid token and 401 to an invalid one.
    app.client
        .get(app.url("/mandelbox/00000000-0000-0000-0000-000000000000"))
        .bearer_auth(token)
        .send()
        .await
        .expect("answers")
        .status()
        .as_u16()
}

/// Every token an attacker might try, by name, each against a tenant that publishes `tenant` only: signed by
/// another key with the tenant's `kid`, expired, not valid yet (`nbf` in the future), for another audience or issuer,
/// `alg=none`, HS256 keyed with the public key, a development token outside `local`, and garbage.
pub(crate) fn forgeries(tenant: &TestKey, attacker: &TestKey) -> Vec<(&'static str, String)> {
    let good = claims("auth0|alice", "openid", ISSUER, AUDIENCE, 600);
    let forged = sign(attacker, &good);
    let expired = sign(
        tenant,
        &claims("auth0|alice", "openid", ISSUER, AUDIENCE, -600),
    );
    let not_valid_yet = sign(tenant, &not_valid_for(&good, 600));
    let wrong_audience = sign(
        tenant,
        &claims("auth0|alice", "openid", ISSUER, "https://other", 600),
    );
    let wrong_issuer = sign(
        tenant,
        &claims(
            "auth0|alice",
            "openid",
            "https://evil.example/",
            AUDIENCE,
            600,
        ),
    );
    let none = unsigned(&tenant.kid, &good);
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(tenant.kid.clone());
        jsonwebtoken::encode(
            &header,
            &good,
            &EncodingKey::from_secret(tenant.public_pem.as_bytes()),
        )
        .expect("signed")
    };
    let dev_token_in_prod = whist_tests::user_token("auth0|alice");
    vec![
        ("forged", forged),
        ("expired", expired),
        ("not valid yet", not_valid_yet),
        ("wrong audience", wrong_audience),
        ("wrong issuer", wrong_issuer),
        ("alg none", none),
        ("HS256 with the public key", hs256_with_public_key),
        ("a development token outside local", dev_token_in_prod),
        ("garbage", "not.a.jwt".to_string()),
    ]
}

#[tokio::test]
async fn a_token_signed_by_the_tenant_is_accepted_and_every_forgery_is_refused() {
    let (tenant, _, attacker) = keys();
    let (jwks_url, _, _server) = serve_jwks(vec![tenant.jwk.clone()]).await;
    let (_database, app) = app_with_auth0(&jwks_url, "prod").await;
    let good = claims("auth0|alice", "openid", ISSUER, AUDIENCE, 600);
    assert_eq!(
        regions_status(&app, &sign(tenant, &good)).await,
        404,
        "a valid token"
    );

    for (name, token) in forgeries(tenant, attacker) {
        assert_eq!(regions_status(&app, &token).await, 401, "{name}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_jwks_is_fetched_over_https_trusting_the_configured_ca_and_nothing_else() {
    let (tenant, _, _) = keys();
    let authority = Authority::new("identity provider CA").expect("a CA");
    let identity = authority.issue(&["127.0.0.1"]).expect("a certificate");
    let (url, _published, endpoint, _server) =
        serve_jwks_with(vec![tenant.jwk.clone()], Duration::ZERO, Some(&identity)).await;
    assert!(url.starts_with("https://"), "{url}");
    let token = sign(
        tenant,
        &claims("auth0|alice", "openid", ISSUER, AUDIENCE, 600),
    );

    // With the endpoint's CA configured (AUTH0_CA_PEM), the keys are fetched over TLS and the token verifies.
    let database = TestDatabase::sqlite();
    let mut settings = auth0_settings(&database, &url, "prod");
    settings.auth0.ca = Some(
        whist_adapters::tls::certificates_from_pem(&authority.certificate_pem())
            .expect("the CA's PEM"),
    );
    let app = spawn_app_with(&database, settings).await;
    assert_eq!(regions_status(&app, &token).await, 404, "accepted");
    assert!(endpoint.fetches() >= 1);
    app.stop().await;

    // With the public roots only, the endpoint's certificate is not trusted: no keys, so no token verifies.
    let fetches_before = endpoint.fetches();
    let (_database, app) = app_with_auth0(&url, "prod").await;
    assert_eq!(regions_status(&app, &token).await, 401, "refused");
    assert_eq!(
        endpoint.fetches(),
        fetches_before,
        "the TLS handshake failed before any request reached the endpoint"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_new_signing_key_is_fetched_once_on_an_unknown_kid() {
    let (tenant, rotated, _) = keys();
    let (jwks_url, published, _server) = serve_jwks(vec![tenant.jwk.clone()]).await;
    let (_database, app) = app_with_auth0(&jwks_url, "prod").await;
    let good = claims("auth0|bob", "openid", ISSUER, AUDIENCE, 600);
    assert_eq!(regions_status(&app, &sign(tenant, &good)).await, 404);
    // The tenant rotates: the new key appears in the JWKS; a token with its kid makes the server fetch again.
    *published.lock().expect("lock") = serde_json::json!({ "keys": [tenant.jwk, rotated.jwk] });
    assert_eq!(regions_status(&app, &sign(rotated, &good)).await, 404);
    app.stop().await;
}

#[tokio::test]
async fn cached_keys_keep_working_when_the_jwks_endpoint_goes_down() {
    let (tenant, _, _) = keys();
    let (jwks_url, _, server) = serve_jwks(vec![tenant.jwk.clone()]).await;
    let (_database, app) = app_with_auth0(&jwks_url, "prod").await;
    let token = sign(
        tenant,
        &claims("auth0|carol", "openid", ISSUER, AUDIENCE, 600),
    );
    assert_eq!(regions_status(&app, &token).await, 404);
    server.abort();
    let _ = server.await;
    assert_eq!(regions_status(&app, &token).await, 404);
    app.stop().await;
}

#[tokio::test]
async fn a_token_whose_not_before_is_in_the_future_is_refused_and_one_within_the_clock_leeway_is_accepted(
) {
    let (tenant, _, _) = keys();
    let (jwks_url, _, _server) = serve_jwks(vec![tenant.jwk.clone()]).await;
    let (_database, app) = app_with_auth0(&jwks_url, "prod").await;
    let good = claims("auth0|erin", "openid", ISSUER, AUDIENCE, 600);
    assert_eq!(
        regions_status(&app, &sign(tenant, &not_valid_for(&good, 120))).await,
        401,
        "nbf two minutes ahead"
    );
    assert_eq!(
        regions_status(&app, &sign(tenant, &not_valid_for(&good, 10))).await,
        404,
        "nbf within the 30 s leeway"
    );
    assert_eq!(
        regions_status(&app, &sign(tenant, &not_valid_for(&good, -60))).await,
        404,
        "nbf in the past"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_is_refused_within_the_cache_ttl_and_a_key_added_is_picked_up()
{
    let ttl = Duration::from_secs(2);
    let (tenant, rotated, _) = keys();
    let (jwks_url, published, endpoint, _server) =
        serve_jwks_answering_after(vec![tenant.jwk.clone()], Duration::ZERO).await;
    let (_database, app) = app_with_auth0_caching_keys_for(&jwks_url, "prod", Some(ttl)).await;
    let good = claims("auth0|frank", "openid", ISSUER, AUDIENCE, 600);
    let old_key_token = sign(tenant, &good);
    let new_key_token = sign(rotated, &good);
    assert_eq!(regions_status(&app, &old_key_token).await, 404);
    // The tenant replaces its key: the old one is removed, a new one added.
    *published.lock().expect("lock") = serde_json::json!({ "keys": [rotated.jwk] });
    let removed = Instant::now();
    let mut accepted_after_removal = 0;
    loop {
        match regions_status(&app, &old_key_token).await {
            404 => accepted_after_removal += 1,
            401 => break,
            other => panic!("GET /mandelbox answered {other}"),
        }
        assert!(
            removed.elapsed() < ttl + Duration::from_secs(2),
            "the removed key still works after {:?}",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_after = removed.elapsed();
    assert!(
        refused_after <= ttl + Duration::from_millis(500),
        "the removed key was refused {refused_after:?} after its removal (JWKS_CACHE_TTL_S is {ttl:?})"
    );
    // The refresh that dropped the old key brought the new one: no fetch is needed for its kid.
    let fetches_before_new_key = endpoint.fetches();
    assert_eq!(regions_status(&app, &new_key_token).await, 404);
    assert_eq!(
        endpoint.fetches(),
        fetches_before_new_key,
        "the new key came with the refresh"
    );
    eprintln!(
        "removed key refused {:.2} s after its removal ({accepted_after_removal} requests accepted meanwhile), \
         {} JWKS fetches",
        refused_after.as_secs_f64(),
        endpoint.fetches()
    );
    app.stop().await;
}

#[tokio::test]
async fn concurrent_tokens_in_the_first_second_of_a_fresh_process_all_wait_for_the_slow_first_jwks_fetch(
) {
    let (tenant, _, _) = keys();
    let jwks_delay = Duration::from_millis(500);
    let (jwks_url, _, endpoint, _server) =
        serve_jwks_answering_after(vec![tenant.jwk.clone()], jwks_delay).await;
    let folder = tempfile::tempdir().expect("a folder");
    let port = free_port();
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve", "--api-only"],
        folder.path(),
        &[
            ("PORT", port.to_string()),
            ("ENVIRONMENT", "prod".to_string()),
            (
                "WHIST_TOKEN_KEYS",
                "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
            ),
            ("AUTH0_JWKS_URL", jwks_url.clone()),
            ("AUTH0_ISSUER", ISSUER.to_string()),
            ("AUTH0_AUDIENCE", AUDIENCE.to_string()),
        ],
        "serve.log",
    );
    server.wait_healthy(Duration::from_secs(30)).await;
    assert_eq!(endpoint.fetches(), 0, "no token has needed the keys yet");
    let client = whist_tests::http_client();
    let first_request = Instant::now();
    let requests = (0..32).map(|user| {
        let client = client.clone();
        let token = sign(
            tenant,
            &claims(
                &format!("auth0|early-{user}"),
                "openid",
                ISSUER,
                AUDIENCE,
                600,
            ),
        );
        async move {
            let status = client
                .get(format!(
                    "http://127.0.0.1:{port}/mandelbox/{}",
                    uuid::Uuid::new_v4()
                ))
                .bearer_auth(token)
                .send()
                .await
                .expect("answers")
                .status()
                .as_u16();
            (status, first_request.elapsed())
        }
    });
    let answers = futures::future::join_all(requests).await;
    let accepted = answers.iter().filter(|(status, _)| *status == 404).count();
    let slowest = answers
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    assert_eq!(
        accepted,
        32,
        "every valid token is accepted while the first fetch runs: {answers:?}\n{}",
        whist_tests::log_troubles([server.log.as_path()])
    );
    assert_eq!(endpoint.fetches(), 1, "one JWKS fetch for all of them");
    assert!(
        slowest >= jwks_delay,
        "the requests waited for the fetch ({slowest:?})"
    );
    eprintln!(
        "{accepted}/32 accepted, the slowest after {:.2} s, {} JWKS fetch(es) answering after {:.1} s",
        slowest.as_secs_f64(),
        endpoint.fetches(),
        jwks_delay.as_secs_f64()
    );
}
