//! Helpers for the black-box test suite: fresh databases, an in-process server on a free port, and the real
//! `whist` binary as a child process.

pub mod connection_budget;
pub mod fault_proxy;
pub mod moto_hosts;
pub mod pgbouncer;
pub mod private_postgres;
pub mod stripe_fake;
pub mod tcp_proxy;

pub use moto_hosts::MotoHosts;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::Executor;
use whist_adapters::config::{Settings, Sources};
use whist_adapters::store::Database;
use whist_api::startup::{Application, ServeOptions};

/// The Postgres server every test uses (each test makes its own database there).
pub fn postgres_server_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Which backend a store test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Postgres,
    Sqlite,
}

/// A database of a test's own: a fresh Postgres database (dropped afterwards) or a fresh SQLite folder.
pub struct TestDatabase {
    pub kind: BackendKind,
    /// `Some` for Postgres.
    pub url: Option<String>,
    /// The embedded store's folder (also the working folder for child processes).
    pub data_dir: tempfile::TempDir,
    name: Option<String>,
    /// The test's share of the server's connections (Postgres only), given back after the database is dropped.
    _admission: Option<connection_budget::Admission>,
}

/// The connections a test of one server may hold on Postgres at its peak (measured: 20 to 28).
pub const ONE_SERVER_CONNECTIONS: u32 = 30;

impl TestDatabase {
    /// A fresh database of the given kind.
    pub async fn new(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Postgres => Self::postgres().await,
            BackendKind::Sqlite => Self::sqlite(),
        }
    }

    /// A fresh, empty Postgres database on the local server, for a test of one server
    /// ([`ONE_SERVER_CONNECTIONS`]).
    pub async fn postgres() -> Self {
        Self::postgres_for(ONE_SERVER_CONNECTIONS).await
    }

    /// A fresh, empty Postgres database on the local server, for a test that holds up to `connections` on it at
    /// once (several processes, a pooler): it waits for that share of the server first (`connection_budget`).
    pub async fn postgres_for(connections: u32) -> Self {
        let admission = connection_budget::admit(&postgres_server_url(), connections).await;
        let name = format!("whist_test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&postgres_server_url())
            .await
            .expect("the test Postgres server at 127.0.0.1:5432 answers");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("a test database can be created");
        admin.close().await;
        let url = with_database(&postgres_server_url(), &name);
        Self {
            kind: BackendKind::Postgres,
            url: Some(url),
            data_dir: tempfile::tempdir().expect("a temporary folder"),
            name: Some(name),
            _admission: Some(admission),
        }
    }

    /// A fresh embedded store in a temporary folder.
    pub fn sqlite() -> Self {
        Self {
            kind: BackendKind::Sqlite,
            url: None,
            data_dir: tempfile::tempdir().expect("a temporary folder"),
            name: None,
            _admission: None,
        }
    }

    /// Connects and migrates.
    pub async fn open(&self) -> Database {
        self.open_with(20).await
    }

    /// Connects with a pool of `max_connections` and migrates.
    pub async fn open_with(&self, max_connections: u32) -> Database {
        let database = Database::connect(
            self.url.as_deref(),
            self.data_dir.path(),
            whist_adapters::store::PoolSettings::sized(max_connections),
        )
        .await
        .expect("the test database opens");
        database.migrate().await.expect("migrations apply");
        database
    }

    /// Settings for a server on this database: defaults, port 0.
    pub fn settings(&self) -> Settings {
        let mut sources = Sources::default();
        sources
            .environment
            .insert("ENVIRONMENT".to_string(), "local".to_string());
        if let Some(url) = &self.url {
            sources
                .environment
                .insert("DATABASE_URL".to_string(), url.clone());
        }
        sources.environment.insert(
            "WHIST_DATA_DIR".to_string(),
            self.data_dir
                .path()
                .join("whist-data")
                .display()
                .to_string(),
        );
        let mut settings = Settings::from_sources(&sources).expect("test settings are valid");
        settings.port = 0;
        // The server names the port it is given once bound.
        settings.public_url = "http://127.0.0.1:0".to_string();
        // Tests run in parallel: simulated hosts of each server get a port of their own. No warm buffer unless a
        // test asks for one.
        settings.host_service_port = host_service_port();
        settings.desired_free_mandelboxes = 0;
        settings.fleet.autoscale = false;
        // Tests run in parallel, some with several servers each, against one Postgres (max_connections 100).
        settings.database_pool_size = TEST_POOL_SIZE;
        // Hosts are started by the tests themselves (simulated hosts in this process, on loopback), as real
        // hosts are started outside the webserver; a test that wants the server's own simulated fleet says so.
        settings.cloud = whist_adapters::config::CloudKind::Aws;
        // EC2 is never the real one: a loopback port nothing listens on, unless a test points it at its moto. (The
        // launch jobs of hosts a test starts itself then fail to reach EC2 and are retried, harmlessly.)
        settings.aws.endpoint_url = Some(format!("http://127.0.0.1:{}", free_port()));
        settings.aws.static_credentials = Some((
            "testing".to_string(),
            whist_adapters::config::Secret::new("testing".to_string()),
        ));
        settings.aws.deployment = "whist-test".to_string();
        settings.stripe.webhook_secret = Some(whist_adapters::config::Secret::new(
            STRIPE_WEBHOOK_SECRET.to_string(),
        ));
        settings
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else { return };
        // Best effort, on a thread of its own: Drop cannot await, and the test's runtime may be shutting down.
        let handle = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(admin) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&postgres_server_url())
                    .await
                {
                    let _ = admin
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                    admin.close().await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// The same server URL naming another database.
pub fn with_database(url: &str, database: &str) -> String {
    let scheme_end = url.find("://").map(|at| at + 3).unwrap_or(0);
    match url[scheme_end..].find('/') {
        Some(slash) => format!("{}/{database}", &url[..scheme_end + slash]),
        None => format!("{url}/{database}"),
    }
}

/// A server running in this test process.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub state: whist_api::AppState,
    /// Users `assign` has made subscribers.
    subscribed: std::sync::Mutex<std::collections::HashSet<String>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// A second server on `first`'s database, whose hosts call the same host-service port: two `serve` processes of
/// one deployment.
pub async fn spawn_second_app(database: &TestDatabase, first: &TestApp) -> TestApp {
    let mut settings = database.settings();
    settings.host_service_port = first.state.settings.host_service_port;
    spawn_app_with(database, settings).await
}

/// Starts a server on `database` on a free port, like `whist serve` would.
pub async fn spawn_app(database: &TestDatabase) -> TestApp {
    spawn_app_with(database, database.settings()).await
}

/// Starts a server with explicit settings.
pub async fn spawn_app_with(database: &TestDatabase, settings: Settings) -> TestApp {
    let _ = database;
    // The server's logs, on the test's stderr (shown for a failed test), when asked for.
    if std::env::var_os("WHIST_TEST_LOGS").is_some() {
        whist_api::telemetry::init_logs(whist_api::telemetry::SERVER_LOGS);
    }
    let application = Application::build(settings, ServeOptions::default())
        .await
        .expect("the server starts");
    let address = format!("http://127.0.0.1:{}", application.port());
    let state = application.state().clone();
    let (shutdown, receiver) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until(async move {
        let _ = receiver.await;
    }));
    let app = TestApp {
        address,
        client: http_client(),
        state,
        subscribed: Default::default(),
        shutdown: Some(shutdown),
        server: Some(server),
    };
    app.wait_for_leadership().await;
    app
}

impl TestApp {
    /// Waits until the server's autoscaler has taken the fleet's lease and recorded the taking (its first pass, at
    /// start-up), so that a test that compares the log before and after something sees only its own events. The
    /// epoch.
    pub async fn wait_for_leadership(&self) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let epoch = self
                .state
                .services
                .leadership
                .load_caught_up(whist_domain::leadership::FLEET_LEADERSHIP_ID)
                .await
                .map(|(leadership, _)| leadership.epoch)
                .unwrap_or(0);
            if epoch > 0 {
                return epoch;
            }
            assert!(
                Instant::now() < deadline,
                "the server's autoscaler took the fleet's lease"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Delivers a Stripe webhook with the given `Stripe-Signature` header; the status.
    pub async fn deliver_webhook(&self, payload: &str, signature: &str) -> u16 {
        self.client
            .post(self.url("/stripe/webhook"))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(payload.to_string())
            .send()
            .await
            .expect("answers")
            .status()
            .as_u16()
    }

    /// Makes `user_id` a subscriber the way Stripe would: a signed `checkout.session.completed` linking a customer,
    /// then a signed `customer.subscription.created` with status `active`.
    pub async fn subscribe(&self, user_id: &str) {
        subscribe_at(&self.client, &self.address, user_id).await;
    }
}

/// An HTTP client for tests (with the process's TLS provider chosen first: see `whist_adapters::tls`).
pub fn http_client() -> reqwest::Client {
    whist_adapters::tls::ensure_crypto_provider();
    reqwest::Client::new()
}

/// The webhook secret test servers are configured with.
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_whist_tests";

/// A `Stripe-Signature` header for `payload`, computed as Stripe documents it: `t=<unix seconds>,v1=<hex of
/// HMAC-SHA256 over "<t>.<payload>" keyed with the endpoint secret>`.
pub fn stripe_signature(payload: &str, secret: &str, timestamp: i64) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("{timestamp}.{payload}").as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// A Stripe event body as Stripe sends it (the fields the webserver reads, plus the usual envelope).
pub fn stripe_event(id: &str, event_type: &str, created: i64, object: serde_json::Value) -> String {
    serde_json::json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": created,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": event_type,
        "data": {"object": object},
    })
    .to_string()
}

/// The Stripe customer id the test helpers give `user_id`.
pub fn test_customer_id(user_id: &str) -> String {
    use sha2::Digest;
    format!(
        "cus_{}",
        &hex::encode(sha2::Sha256::digest(user_id.as_bytes()))[..14]
    )
}

/// Subscribes `user_id` through the webhook of the server at `base` (see `TestApp::subscribe`).
pub async fn subscribe_at(client: &reqwest::Client, base: &str, user_id: &str) {
    let customer = test_customer_id(user_id);
    let now = chrono::Utc::now().timestamp();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let events = [
        stripe_event(
            &format!("evt_checkout_{unique}"),
            "checkout.session.completed",
            now,
            serde_json::json!({
                "id": format!("cs_{unique}"),
                "object": "checkout.session",
                "mode": "subscription",
                "customer": customer,
                "client_reference_id": user_id,
            }),
        ),
        stripe_event(
            &format!("evt_created_{unique}"),
            "customer.subscription.created",
            now,
            serde_json::json!({
                "id": format!("sub_{unique}"),
                "object": "subscription",
                "customer": customer,
                "status": "active",
            }),
        ),
    ];
    for payload in events {
        let status = client
            .post(format!("{base}/stripe/webhook"))
            .header(
                "Stripe-Signature",
                stripe_signature(&payload, STRIPE_WEBHOOK_SECRET, now),
            )
            .header("Content-Type", "application/json")
            .body(payload)
            .send()
            .await
            .expect("the webhook answers")
            .status();
        assert_eq!(status.as_u16(), 200, "the webhook takes a signed event");
    }
}

/// Connections per pool of a server under test (it keeps two): small enough that the parallel tests, some with
/// three servers on one database, fit in the machine's Postgres `max_connections` (100).
pub const TEST_POOL_SIZE: u32 = 8;

/// A `whist` child process.
pub struct ChildProcess {
    pub child: Child,
    pub port: Option<u16>,
    pub log: PathBuf,
}

/// A poem acceptor bound to a free loopback port, and that port: where the tests' own servers (fakes, proxies,
/// a JWKS) listen.
pub async fn loopback_acceptor() -> (poem::listener::TcpAcceptor, u16) {
    use poem::listener::Listener;
    let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
        .into_acceptor()
        .await
        .expect("a loopback port");
    let port = port_of(&acceptor);
    (acceptor, port)
}

/// The port a loopback acceptor is bound to.
fn port_of(acceptor: &impl poem::listener::Acceptor) -> u16 {
    acceptor
        .local_addr()
        .first()
        .and_then(|address| address.as_socket_addr().map(|socket| socket.port()))
        .expect("a port")
}

/// As [`loopback_acceptor`], serving TLS with `identity`.
pub async fn loopback_tls_acceptor(
    identity: &whist_adapters::tls::ServerIdentity,
) -> (poem::listener::BoxAcceptor, u16) {
    use poem::listener::{AcceptorExt, Listener};
    let acceptor = poem::listener::TcpListener::bind("127.0.0.1:0")
        .rustls(identity.listener_config())
        .into_acceptor()
        .await
        .expect("a loopback port");
    let port = port_of(&acceptor);
    (acceptor.boxed(), port)
}

/// Waits until something listens on loopback `port`; whether it did within `timeout`.
pub async fn wait_listening(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Makes `image` with `commit_hash` the active image of `regions` on `store`: the first release of a deployment
/// that a test's processes share.
pub async fn activate_release(
    store: &whist_adapters::store::Database,
    regions: &[&str],
    image: &str,
    commit_hash: &str,
) {
    let catalog =
        whist_adapters::store::AggregateStore::<whist_domain::images::ImageCatalog>::new(store, ());
    activate_in(&catalog, regions, image, commit_hash).await;
}

/// Makes `image` with `commit_hash` the active image of `regions` through `catalog` (a server's own store, so that
/// the copy it remembers sees the release).
async fn activate_in(
    catalog: &whist_adapters::store::AggregateStore<whist_domain::images::ImageCatalog>,
    regions: &[&str],
    image: &str,
    commit_hash: &str,
) {
    catalog
        .execute(
            whist_domain::images::CATALOG_ID,
            whist_domain::images::ImageCatalogCommand::Activate {
                client_commit_hash: commit_hash.to_string(),
                images: regions
                    .iter()
                    .map(|region| (region.to_string(), image.to_string()))
                    .collect(),
                at: chrono::Utc::now(),
            },
            &whist_domain::EventMetadata::new(whist_domain::Actor::System, chrono::Utc::now()),
        )
        .await
        .expect("the release is activated");
}

/// The hosts of `region` the fleet's read model shows now, one line each, for a failing test's message.
pub async fn fleet_rows(store: &whist_adapters::store::Database, region: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT instance_id || ' ' || image_id || ' ' || status || ' ' || live_mandelboxes || '/' \
         || mandelbox_capacity || ' since ' || updated_at FROM instances WHERE region = $1 ORDER BY instance_id",
    )
    .bind(region)
    .fetch_all(store.any())
    .await
    .unwrap_or_else(|error| vec![format!("the read model did not answer: {error}")])
}

/// Every change of a host's life (launch, registration, drain, silence, end; not its slots) and of the fleet's
/// leadership, in log order, with when and by whom it was decided, for a failing test's message.
pub async fn fleet_history(store: &whist_adapters::store::Database) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT position || ' ' || aggregate_id || ' ' || event_type || ' at ' \
         || COALESCE(metadata->>'recorded_at', '') || ' by ' || COALESCE(metadata->>'actor', '') FROM events \
         WHERE aggregate_type IN ('instance', 'leadership') \
           AND event_type NOT IN ('InstanceMandelboxAllocated', 'InstanceMandelboxFreed') \
         ORDER BY position",
    )
    .fetch_all(store.any())
    .await
    .unwrap_or_else(|error| vec![format!("the log did not answer: {error}")])
}

/// The warnings, errors and panics in each log file (at most 20 lines each), for a failing test's message.
pub fn log_troubles<'a>(logs: impl IntoIterator<Item = &'a Path>) -> String {
    logs.into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| {
                    line.contains("ERROR") || line.contains("WARN") || line.contains("panick")
                })
                .take(20)
                .collect();
            format!("{}:\n{}", path.display(), lines.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// A port for simulated host services, which bind it on loopback addresses of their own (127.b.c.d): free now, and
/// below the kernel's ephemeral range (32768 and up), so that no server of a test running beside this one that binds
/// the wildcard address to port 0 can be given it before the hosts bind it. CI saw a host find all its addresses
/// taken when its port came from that range. [`free_port`] picks from the range just above this one.
pub fn host_service_port() -> u16 {
    unclaimed_port(10_000..21_000, "127.0.0.1")
}

/// A port for a server a test starts (a `whist` child, moto, PgBouncer, a private Postgres): free on every address
/// now, and, like [`host_service_port`]'s, below the kernel's ephemeral range. A port bound to 0 and released is the
/// kernel's next answer to another test's bind to 0, which took it before the child bound it ("Address already in
/// use", seen in CI); a random one from a range the kernel never hands out is taken in between only by another
/// test's draw of the same number.
pub fn free_port() -> u16 {
    unclaimed_port(21_000..32_000, "0.0.0.0")
}

/// A port of `range` that `address` can bind now and that this process has not handed out before.
fn unclaimed_port(range: std::ops::Range<u16>, address: &str) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let span = u128::from(range.end - range.start);
    loop {
        let offset = u16::try_from(uuid::Uuid::new_v4().as_u128() % span).expect("below the span");
        let port = range.start + offset;
        let mut handed_out = HANDED_OUT.lock().expect("the handed-out ports");
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind((address, port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
}

impl ChildProcess {
    /// Starts `binary` with `arguments` in `working_dir`, with only the given environment (plus PATH), logging
    /// to a file in `working_dir`.
    pub fn start(
        binary: &Path,
        arguments: &[&str],
        working_dir: &Path,
        environment: &[(&str, String)],
        log_name: &str,
    ) -> Self {
        let log = working_dir.join(log_name);
        let log_file = std::fs::File::create(&log).expect("a log file");
        let mut command = Command::new(binary);
        command
            .args(arguments)
            .current_dir(working_dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            // EC2, should a test run this process with `WHIST_CLOUD=aws`, is never the real one: a loopback port
            // nothing listens on, unless the test's own environment names its moto.
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", free_port()),
            )
            .env("WHIST_DB_POOL_SIZE", TEST_POOL_SIZE.to_string())
            // Tests run the binary as a developer would, unless their own environment says otherwise (an empty
            // value counts as unset); with `WHIST_CLOUD=aws` their instances carry the tests' tag.
            .env("ENVIRONMENT", "local")
            .env("WHIST_DEPLOYMENT", "whist-test")
            // The tests' hosts, simulated or standing in for EC2's, all listen on loopback.
            .env("HOST_NETWORK_CIDRS", r#"["127.0.0.0/8"]"#)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file);
        let mut port = None;
        for (key, value) in environment {
            if *key == "PORT" {
                port = value.parse().ok();
            }
            command.env(key, value);
        }
        let child = command.spawn().expect("the whist binary starts");
        Self { child, port, log }
    }

    /// The process's id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// The process's exit status once it has exited, `None` if it is still running after `timeout`. Polls
    /// without blocking the thread: a test's app often runs on the same runtime (a blocked current-thread runtime
    /// would freeze the app mid-transaction, and a command waiting on its locks would never exit).
    pub async fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// What the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/healthz` until it answers 200.
    pub async fn wait_healthy(&mut self, timeout: Duration) {
        let port = self.port.expect("the process was given a PORT");
        let client = http_client();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(response) = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                if response.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("whist exited early with {status}: {}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("whist did not become healthy: {}", self.log_text());
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes; whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A host launched by a test: its aggregate was told to launch, and a simulated host service in this process
/// registered with the bootstrap token, heartbeats, and starts mandelboxes when asked.
pub struct TestHost {
    pub instance_id: String,
    pub auth_token: String,
    pub host: whist_adapters::simulated_host::SimulatedHost,
}

/// The identity tests launch hosts with.
pub fn launch_spec(
    region: &str,
    image_id: &str,
    commit_hash: &str,
) -> whist_domain::instance::LaunchSpec {
    whist_domain::instance::LaunchSpec {
        region: region.to_string(),
        image_id: image_id.to_string(),
        client_commit_hash: commit_hash.to_string(),
        instance_type: "g4dn.2xlarge".to_string(),
    }
}

/// Records a launch decision in `instances` and returns the new host's id and bootstrap token.
pub async fn record_launch(
    instances: &whist_adapters::store::AggregateStore<whist_domain::instance::Instance>,
    tokens: &whist_adapters::tokens::Tokens,
    spec: whist_domain::instance::LaunchSpec,
) -> (String, String) {
    use whist_adapters::tokens::{fingerprint, Purpose};
    let instance_id = uuid::Uuid::new_v4().to_string();
    let bootstrap = tokens.derive(Purpose::Bootstrap, &instance_id);
    instances
        .execute(
            &instance_id,
            whist_domain::instance::InstanceCommand::RequestLaunch {
                spec,
                bootstrap_token_hash: fingerprint(&bootstrap),
                reason: whist_domain::instance::LaunchReason::Operator,
                at: chrono::Utc::now(),
            },
            &whist_domain::EventMetadata::new(whist_domain::Actor::System, chrono::Utc::now()),
        )
        .await
        .expect("the launch is recorded");
    (instance_id, bootstrap)
}

/// Starts a simulated host service for a recorded launch; it registers with `webserver_url` by itself.
pub async fn start_host(
    instance_id: &str,
    bootstrap: &str,
    spec: &whist_domain::instance::LaunchSpec,
    capacity: u32,
    webserver_url: &str,
    port: u16,
) -> whist_adapters::simulated_host::SimulatedHost {
    whist_adapters::simulated_host::start(whist_adapters::simulated_host::SimulatedHostSpec {
        instance_id: instance_id.to_string(),
        bootstrap_token: bootstrap.to_string(),
        webserver_url: webserver_url.to_string(),
        region: spec.region.clone(),
        image_id: spec.image_id.clone(),
        instance_type: spec.instance_type.clone(),
        client_commit_hash: spec.client_commit_hash.clone(),
        mandelbox_capacity: capacity,
        port,
        tls: whist_adapters::simulated_host::HostTls::SelfSigned,
    })
    .await
    .expect("the simulated host starts")
}

impl TestApp {
    /// Records a launch decision for a new host and returns its id and bootstrap token.
    pub async fn launch(&self, spec: whist_domain::instance::LaunchSpec) -> (String, String) {
        record_launch(
            &self.state.services.instances,
            &self.state.services.tokens,
            spec,
        )
        .await
    }

    /// Makes `image_id` with `commit_hash` the active image of `regions`.
    pub async fn activate_image(&self, regions: &[&str], image_id: &str, commit_hash: &str) {
        activate_in(&self.state.services.catalog, regions, image_id, commit_hash).await;
    }

    /// Waits until every projection of this server has caught up with the log.
    pub async fn settled(&self) {
        assert!(
            eventually(Duration::from_secs(20), || async {
                self.state
                    .projections
                    .status()
                    .await
                    .map(|statuses| statuses.iter().all(|status| status.lag == 0))
                    .unwrap_or(false)
            })
            .await,
            "the projections catch up"
        );
    }

    /// Launches a host with `capacity` slots, starts its simulated host service, and waits until assigns can
    /// see it.
    pub async fn active_host(
        &self,
        spec: whist_domain::instance::LaunchSpec,
        capacity: u32,
    ) -> TestHost {
        let (instance_id, bootstrap) = self.launch(spec.clone()).await;
        let host = start_host(
            &instance_id,
            &bootstrap,
            &spec,
            capacity,
            &self.address,
            self.state.settings.host_service_port,
        )
        .await;
        self.wait_for_instance(&instance_id, "ACTIVE").await;
        let auth_token = self
            .state
            .services
            .tokens
            .derive(whist_adapters::tokens::Purpose::HostAuth, &instance_id);
        TestHost {
            instance_id,
            auth_token,
            host,
        }
    }

    /// Waits until the `instances` read model shows the host in `status`.
    pub async fn wait_for_instance(&self, instance_id: &str, status: &str) {
        self.wait_for_instance_within(instance_id, status, Duration::from_secs(10))
            .await;
    }

    /// `wait_for_instance` with a longer patience.
    pub async fn wait_for_instance_within(
        &self,
        instance_id: &str,
        status: &str,
        timeout: Duration,
    ) {
        let database = self.state.database.clone();
        let reached = eventually(timeout, || {
            let database = database.clone();
            let instance_id = instance_id.to_string();
            let status = status.to_string();
            async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT status FROM instances WHERE instance_id = $1",
                )
                .bind(instance_id)
                .fetch_optional(database.any())
                .await
                .ok()
                .flatten()
                .is_some_and(|found| found == status)
            }
        })
        .await;
        assert!(reached, "host {instance_id} reached {status}");
    }

    /// Waits until the read model shows `live` mandelboxes on the host.
    pub async fn wait_for_live(&self, instance_id: &str, live: i64) {
        let database = self.state.database.clone();
        let reached = eventually(Duration::from_secs(10), || {
            let database = database.clone();
            let instance_id = instance_id.to_string();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT live_mandelboxes FROM instances WHERE instance_id = $1",
                )
                .bind(instance_id)
                .fetch_optional(database.any())
                .await
                .ok()
                .flatten()
                    == Some(live)
            }
        })
        .await;
        assert!(
            reached,
            "host {instance_id} reached {live} live mandelboxes"
        );
    }

    /// The server's `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("answers")
            .text()
            .await
            .expect("text")
    }

    /// The protocol server's `POST /mandelbox/{id}/disconnect` with the mandelbox's secret; the status.
    pub async fn disconnect(&self, mandelbox_id: &str) -> u16 {
        self.disconnect_request(mandelbox_id)
            .send()
            .await
            .expect("answers")
            .status()
            .as_u16()
    }

    /// The protocol server's disconnect of `mandelbox_id`, with its secret, ready to send (or to add headers to).
    pub fn disconnect_request(&self, mandelbox_id: &str) -> reqwest::RequestBuilder {
        let secret = self
            .state
            .services
            .tokens
            .derive(whist_adapters::tokens::Purpose::Protocol, mandelbox_id);
        self.client
            .post(self.url(&format!("/mandelbox/{mandelbox_id}/disconnect")))
            .bearer_auth(secret)
    }

    /// `GET /mandelbox/{id}` as `token`'s user; the body.
    pub async fn mandelbox_view(&self, token: &str, mandelbox_id: &str) -> serde_json::Value {
        self.client
            .get(self.url(&format!("/mandelbox/{mandelbox_id}")))
            .bearer_auth(token)
            .send()
            .await
            .expect("answers")
            .json()
            .await
            .expect("a JSON body")
    }

    /// POST /mandelbox/assign; (status, body). Assigns as a paying user: the token's user is first made a subscriber through signed webhooks (once per
    /// user), as Stripe would. Tests of the subscription gate itself post to the endpoint directly.
    pub async fn assign(&self, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        if let Some(user_id) = token_subject(token) {
            let first_time = self
                .subscribed
                .lock()
                .map(|mut subscribed| subscribed.insert(user_id.clone()))
                .unwrap_or(true);
            if first_time {
                subscribe_at(&self.client, &self.address, &user_id).await;
            }
        }
        let response = self
            .client
            .post(self.url("/mandelbox/assign"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("answers");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }
}

/// The value of one sample of a Prometheus text (`name{labels}` exactly as the exporter writes it), `None` when it
/// is not there.
pub fn metric_sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name_and_labels)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// The `sub` of a JWT (read, not verified: the server verifies).
pub fn token_subject(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["sub"].as_str().map(str::to_string)
}

/// A development token (accepted while `ENVIRONMENT=local`).
pub fn user_token(user_id: &str) -> String {
    whist_adapters::auth::dev_token(user_id, false, Duration::from_secs(3600)).expect("signed")
}

/// A development token with scope `admin`.
pub fn admin_token(user_id: &str) -> String {
    whist_adapters::auth::dev_token(user_id, true, Duration::from_secs(3600)).expect("signed")
}

/// An assign body for `region` and `commit_hash`.
pub fn assign_body(regions: &[&str], commit_hash: &str, session_id: i64) -> serde_json::Value {
    serde_json::json!({
        "regions": regions,
        "client_commit_hash": commit_hash,
        "session_id": session_id,
        "user_email": "user@example.com",
    })
}

/// moto's EC2 on a free loopback port, for the tests' EC2 (never a real cloud); stops when dropped.
pub struct Moto {
    pub endpoint: String,
    child: Child,
}

impl Moto {
    /// Starts `moto_server` (installed by `.ci/run` with `pip install 'moto[server]'`) and waits until EC2 answers.
    pub async fn start() -> Self {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // Unknown instance types are refused, as EC2 refuses them.
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server runs (pip install 'moto[server]')");
        let moto = Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        };
        let ec2 = moto.ec2("whist-test");
        let started = Instant::now();
        loop {
            if ec2.list("us-east-1").await.is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto did not answer within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        moto
    }

    /// EC2 for `deployment` through this moto.
    pub fn ec2(&self, deployment: &str) -> whist_adapters::ec2::Ec2 {
        whist_adapters::ec2::Ec2::new(
            deployment,
            whist_adapters::ec2::Ec2Access {
                endpoint_url: Some(self.endpoint.clone()),
                static_credentials: Some(("testing".to_string(), "testing".to_string())),
            },
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
