//! Auth0 tokens: RS256 only, key by `kid` from a JWKS served on loopback with keys this test makes.

use std::sync::{Arc, OnceLock};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use poem::{handler, web::Data, EndpointExt, Route};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use whist_tests::{spawn_app_with, TestDatabase};

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

#[handler]
fn jwks(
    Data(published): Data<&Arc<std::sync::Mutex<serde_json::Value>>>,
) -> poem::web::Json<serde_json::Value> {
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
    let published = Arc::new(std::sync::Mutex::new(serde_json::json!({ "keys": keys })));
    let (acceptor, port) = whist_tests::loopback_acceptor().await;
    let app = Route::new()
        .at("/.well-known/jwks.json", poem::get(jwks))
        .data(published.clone());
    let server = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
    });
    (
        format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
        published,
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
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.auth0.jwks_url = Some(jwks_url.to_string());
    settings.auth0.issuer = Some(ISSUER.to_string());
    settings.auth0.audience = Some(AUDIENCE.to_string());
    settings.environment = match environment {
        "prod" => whist_adapters::config::Environment::Prod,
        _ => whist_adapters::config::Environment::Local,
    };
    let app = spawn_app_with(&database, settings).await;
    (database, app)
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
/// another key with the tenant's `kid`, expired, for another audience or issuer, `alg=none`, HS256 keyed with the
/// public key, a development token outside `local`, and garbage.
pub(crate) fn forgeries(tenant: &TestKey, attacker: &TestKey) -> Vec<(&'static str, String)> {
    let good = claims("auth0|alice", "openid", ISSUER, AUDIENCE, 600);
    let forged = sign(attacker, &good);
    let expired = sign(
        tenant,
        &claims("auth0|alice", "openid", ISSUER, AUDIENCE, -600),
    );
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
