//! TLS to host services, the contract's default: a host is pinned by the certificate fingerprint it registered, or,
//! with `HOST_SERVICE_CA_PEM`, trusted by a certificate that CA issued for its address. A host that presents any
//! other certificate gets no request at all; the spin-up is retried and its job says why.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use poem::listener::{AcceptorExt, Listener, TcpListener};
use poem::web::Data;
use poem::{handler, EndpointExt, Route};
use tokio::sync::watch;
use whist_adapters::simulated_host::HostTls;
use whist_adapters::tls::{Authority, ServerIdentity};
use whist_tests::{
    assign_body, eventually, launch_spec, spawn_app, spawn_app_with, user_token, TestApp,
    TestDatabase,
};

const REGION: &str = "us-east-1";
const IMAGE: &str = "ami-tls";
const HASH: &str = "hash-tls";

/// A host service that serves `served` but registered `declared` as its fingerprint (or none): it counts every
/// request that gets through to it.
struct Impostor {
    requests: Arc<AtomicU64>,
    _stop: watch::Sender<bool>,
}

#[handler]
async fn count(Data(requests): Data<&Arc<AtomicU64>>) -> &'static str {
    requests.fetch_add(1, Ordering::SeqCst);
    "{}"
}

impl Impostor {
    /// Binds a loopback address of its own, serves `serve(ip)`, and registers `declare(&served)` as its fingerprint.
    async fn start(
        app: &TestApp,
        serve: impl Fn(Ipv4Addr) -> ServerIdentity,
        declare: impl Fn(&ServerIdentity) -> Option<String>,
    ) -> Self {
        let spec = launch_spec(REGION, IMAGE, HASH);
        let (instance_id, bootstrap) = app.launch(spec.clone()).await;
        let port = app.state.settings.host_service_port;
        let mut bound = None;
        for _ in 0..50 {
            let ip = Ipv4Addr::new(127, 202, rand::random::<u8>(), rand::random::<u8>().max(2));
            let identity = serve(ip);
            if let Ok(acceptor) = TcpListener::bind(format!("{ip}:{port}"))
                .rustls(identity.listener_config())
                .into_acceptor()
                .await
            {
                bound = Some((ip, acceptor.boxed(), identity));
                break;
            }
        }
        let (ip, acceptor, identity) = bound.expect("a loopback address for the host");
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = watch::channel(false);
        let endpoint = Route::new()
            .at("/spin_up_mandelbox", poem::put(count))
            .at("/drain_and_shutdown", poem::post(count))
            .data(requests.clone());
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    endpoint,
                    async move {
                        let _ = stopped.wait_for(|stopped| *stopped).await;
                    },
                    Some(Duration::from_millis(100)),
                )
                .await;
        });
        let mut body = serde_json::json!({
            "instance_id": instance_id,
            "region": spec.region,
            "image_id": spec.image_id,
            "instance_type": spec.instance_type,
            "client_commit_hash": spec.client_commit_hash,
            "ip": ip.to_string(),
            // One slot: the first assign fills it, and later ones go to other hosts.
            "mandelbox_capacity": 1,
        });
        if let Some(fingerprint) = declare(&identity) {
            body["tls_cert_sha256"] = serde_json::Value::String(fingerprint);
        }
        let status = app
            .client
            .post(app.url("/host/register"))
            .bearer_auth(bootstrap)
            .json(&body)
            .send()
            .await
            .expect("registration is answered")
            .status();
        assert_eq!(status, 200, "the host registers");
        app.wait_for_instance(&instance_id, "ACTIVE").await;
        Self {
            requests,
            _stop: stop,
        }
    }
}

/// Assigns a mandelbox as a new user; its id.
async fn assign(app: &TestApp, user: &str) -> String {
    let (status, body) = app
        .assign(&user_token(user), assign_body(&[REGION], HASH, 1))
        .await;
    assert_eq!(status, 200, "{body}");
    body["mandelbox_id"]
        .as_str()
        .expect("a mandelbox id")
        .to_string()
}

/// The spin-up job of a mandelbox: (status, attempts, last error).
async fn spin_up_job(app: &TestApp, mandelbox_id: &str) -> Option<(String, i64, Option<String>)> {
    sqlx::query_as(
        "SELECT status, attempts, last_error FROM jobs \
         WHERE kind = 'spin_up_mandelbox' AND aggregate_id = $1",
    )
    .bind(mandelbox_id)
    .fetch_optional(app.state.database.any())
    .await
    .expect("the jobs read")
}

/// Waits until the spin-up has been tried at least twice and failed with an error containing `expected`.
async fn refused_and_retried(app: &TestApp, mandelbox_id: &str, expected: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = spin_up_job(app, mandelbox_id).await;
        if let Some((_, attempts, Some(error))) = &job {
            if *attempts >= 2 && error.contains(expected) {
                return error.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the spin-up is refused and retried: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn mandelbox_status(app: &TestApp, user: &str, mandelbox_id: &str) -> serde_json::Value {
    app.mandelbox_view(&user_token(user), mandelbox_id).await["status"].clone()
}

async fn reaches_running(app: &TestApp, user: &str, mandelbox_id: &str) -> bool {
    eventually(Duration::from_secs(20), || async {
        mandelbox_status(app, user, mandelbox_id).await == "RUNNING"
    })
    .await
}

#[tokio::test]
async fn a_host_is_called_only_with_the_certificate_it_registered() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    app.activate_image(&[REGION], IMAGE, HASH).await;

    // A host that registered another certificate's fingerprint than the one it serves.
    let impostor = Impostor::start(
        &app,
        |ip| ServerIdentity::self_signed(ip.into()).expect("a certificate"),
        |_| {
            Some(
                ServerIdentity::self_signed(Ipv4Addr::LOCALHOST.into())
                    .expect("a certificate")
                    .sha256,
            )
        },
    )
    .await;
    let user = "auth0|tls-pinned";
    let mandelbox_id = assign(&app, user).await;
    let error = refused_and_retried(&app, &mandelbox_id, "is not the one it registered").await;
    assert!(error.contains("sha256"), "{error}");
    assert_eq!(
        impostor.requests.load(Ordering::SeqCst),
        0,
        "no request reaches a host presenting another certificate"
    );
    assert_eq!(
        mandelbox_status(&app, user, &mandelbox_id).await,
        "ALLOCATED"
    );

    // An honest host (a simulated host service serving the certificate it registered) is called.
    let _host = app.active_host(launch_spec(REGION, IMAGE, HASH), 2).await;
    let honest_user = "auth0|tls-pinned-honest";
    let mandelbox_id = assign(&app, honest_user).await;
    assert!(
        reaches_running(&app, honest_user, &mandelbox_id).await,
        "a host serving the certificate it registered is called: {:?}",
        spin_up_job(&app, &mandelbox_id).await
    );
    drop(impostor);
    app.stop().await;
}

#[tokio::test]
async fn with_a_host_service_ca_a_host_is_trusted_by_a_certificate_issued_for_its_address() {
    let authority = Arc::new(Authority::new("whist host services").expect("a CA"));
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.host_service_ca = Some(
        whist_adapters::tls::certificates_from_pem(&authority.certificate_pem())
            .expect("the CA's PEM"),
    );
    let app = spawn_app_with(&database, settings).await;
    app.activate_image(&[REGION], IMAGE, HASH).await;
    assert!(
        !app.state.settings.host_tls_pin_required(),
        "with a CA no fingerprint is needed"
    );

    // A host whose certificate another CA issued, for its own address: refused, though it names the address.
    let stranger = Arc::new(Authority::new("someone else").expect("a CA"));
    let impostor = Impostor::start(
        &app,
        |ip| stranger.issue(&[&ip.to_string()]).expect("a certificate"),
        |_| None,
    )
    .await;
    let user = "auth0|tls-ca-stranger";
    let mandelbox_id = assign(&app, user).await;
    let error = refused_and_retried(&app, &mandelbox_id, "certificate").await;
    assert!(error.to_lowercase().contains("issuer"), "{error}");
    assert_eq!(impostor.requests.load(Ordering::SeqCst), 0);

    // A host whose certificate the CA issued for another address: refused.
    let misnamed = Impostor::start(
        &app,
        |_| authority.issue(&["127.0.0.1"]).expect("a certificate"),
        |_| None,
    )
    .await;
    let user = "auth0|tls-ca-misnamed";
    let mandelbox_id = assign(&app, user).await;
    let error = refused_and_retried(&app, &mandelbox_id, "certificate").await;
    assert!(error.to_lowercase().contains("not valid for"), "{error}");
    assert_eq!(misnamed.requests.load(Ordering::SeqCst), 0);

    // A host with a certificate the CA issued for its address, registered without a fingerprint: called.
    let spec = launch_spec(REGION, IMAGE, HASH);
    let (instance_id, bootstrap) = app.launch(spec.clone()).await;
    let _host =
        whist_adapters::simulated_host::start(whist_adapters::simulated_host::SimulatedHostSpec {
            instance_id: instance_id.clone(),
            bootstrap_token: bootstrap,
            webserver_url: app.address.clone(),
            region: spec.region.clone(),
            image_id: spec.image_id.clone(),
            instance_type: spec.instance_type.clone(),
            client_commit_hash: spec.client_commit_hash.clone(),
            mandelbox_capacity: 2,
            port: app.state.settings.host_service_port,
            tls: HostTls::IssuedBy(authority.clone()),
        })
        .await
        .expect("the host starts");
    app.wait_for_instance(&instance_id, "ACTIVE").await;
    let user = "auth0|tls-ca-issued";
    let mandelbox_id = assign(&app, user).await;
    assert!(
        reaches_running(&app, user, &mandelbox_id).await,
        "a host with a certificate the CA issued for its address is called: {:?}",
        spin_up_job(&app, &mandelbox_id).await
    );
    drop((impostor, misnamed));
    app.stop().await;
}
