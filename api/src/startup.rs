//! Building and running a `serve` process.

use std::future::Future;
use std::sync::Arc;

use poem::{EndpointExt, Route};
use poem_openapi::OpenApiService;
use whist_adapters::config::Settings;
use whist_adapters::store::{Database, DatabaseError, PoolSettings};
use whist_projections::ProjectionRunner;

use std::collections::BTreeMap;

use whist_adapters::config::CloudKind;
use whist_domain::images::{ImageCatalogCommand, CATALOG_ID};
use whist_domain::{Actor, EventMetadata};

use crate::http::admin::{AdminApi, OperatorApi};
use crate::http::billing::BillingApi;
use crate::http::desktop::DesktopApi;
use crate::http::hirefire::HireFireApi;
use crate::http::host::HostApi;
use crate::http::middleware::RequestContext;
use crate::http::openapi::SwaggerUi;
use crate::http::ops::OpsApi;
use crate::services::Services;
use crate::state::{AppState, Context};
use crate::workers::background::Background;

/// Options of `whist serve`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Serve HTTP only: no projections, reconciler or autoscaler in this process.
    pub api_only: bool,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("could not prepare the server's services")]
    Services(#[from] crate::services::ServicesError),
    #[error("could not listen on port {port}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// A built server, bound to its port, not yet serving.
pub struct Application {
    port: u16,
    listener: tokio::net::TcpListener,
    state: AppState,
    background: Option<Background>,
}

/// What a command does with the store's schema before it runs (the expand/contract policy in ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    /// Apply what is pending (`whist migrate`, the release step).
    Apply,
    /// Apply on start unless `WHIST_AUTO_MIGRATE=false`; then refuse a schema behind this binary (`serve`,
    /// `worker`, and the commands that record decisions).
    OnStart,
    /// Leave the schema as it is (read-only commands: `events`, `projections status`, `config`, `dev`).
    Leave,
}

/// Opens the store named by the settings, doing what `migrations` says with its schema.
///
/// # Errors
/// The store cannot be reached or migrated, or its schema is behind and may not be migrated here.
pub async fn open_database(
    settings: &Settings,
    migrations: Migrations,
) -> Result<Database, DatabaseError> {
    let url = settings.database_url.as_ref().map(|url| url.expose());
    let direct = settings
        .database_direct_url
        .as_ref()
        .map(|url| url.expose());
    let pools = PoolSettings {
        max_connections: settings.database_pool_size,
        limits: settings.database_session_limits,
    };
    let database = match (url, direct) {
        (Some(url), Some(direct)) => Database::connect_split(url, direct, pools).await?,
        (url, _) => Database::connect(url, &settings.data_dir, pools).await?,
    };
    match migrations {
        Migrations::Apply => database.migrate().await?,
        Migrations::OnStart if settings.auto_migrate => database.migrate().await?,
        Migrations::OnStart => database.require_migrated().await?,
        Migrations::Leave => {}
    }
    tracing::info!(
        store = database.description(),
        ?migrations,
        "event store ready"
    );
    Ok(database)
}

/// A control plane without HTTP over the store named by the settings (migrated): its projections runner and
/// services, for `whist worker` and the command-line tools. Nothing runs in the background until asked.
///
/// # Errors
/// The store cannot be reached or migrated, or the services cannot be prepared.
pub async fn control_plane(settings: Settings) -> Result<Context, StartupError> {
    let database = open_database(&settings, Migrations::OnStart).await?;
    let projections = ProjectionRunner::new(database.clone(), whist_projections::all());
    let services = Arc::new(Services::new(&settings, &database).await?);
    Ok(Context::new(
        Arc::new(settings),
        database,
        projections,
        services,
    ))
}

impl Application {
    /// Connects, migrates, starts the background work and binds the port (`PORT`; 0 picks a free one).
    ///
    /// # Errors
    /// The store cannot be reached or migrated, or the port cannot be bound.
    pub async fn build(settings: Settings, options: ServeOptions) -> Result<Self, StartupError> {
        let database = open_database(&settings, Migrations::OnStart).await?;
        Self::build_with_database(settings, database, options).await
    }

    /// As [`Application::build`], over an already opened store.
    ///
    /// # Errors
    /// The port cannot be bound.
    pub async fn build_with_database(
        settings: Settings,
        database: Database,
        options: ServeOptions,
    ) -> Result<Self, StartupError> {
        let projections = ProjectionRunner::new(database.clone(), whist_projections::all());
        let services = Arc::new(Services::new(&settings, &database).await?);
        if settings.cloud == CloudKind::Local {
            activate_simulated_images(&settings, &services).await;
        }
        let mut settings = settings;
        let configured_port = settings.port;
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", configured_port))
            .await
            .map_err(|source| StartupError::Listen {
                port: configured_port,
                source,
            })?;
        let port = listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or(configured_port);
        if configured_port == 0 && settings.public_url.ends_with(":0") {
            // The default PUBLIC_URL names PORT; with a port picked by the system, name the one picked.
            settings.public_url = format!("http://127.0.0.1:{port}");
        }
        let state = AppState::new(
            Arc::new(settings),
            database.clone(),
            projections.clone(),
            services,
        );
        let mut background = Background::spawn_with_shutdown(state.services.heartbeats.clone());
        background.adopt(Background::start_membership(
            state.services.members.clone(),
            database.background_loops(),
        ));
        if !options.api_only {
            background.adopt(Background::start(&database, projections));
            background.adopt(Background::start_control(&state));
        }
        let background = Some(background);
        Ok(Self {
            port,
            listener,
            state,
            background,
        })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes; then refuses new requests with 503, lets those in flight finish, stops
    /// the background work and returns, all within `SHUTDOWN_GRACE_S` of the signal.
    ///
    /// # Errors
    /// The listener failed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let state = self.state.clone();
        let app = routes(self.state.clone());
        let draining_state = state.clone();
        let grace = state.settings.shutdown_grace;
        let deadline = Arc::new(std::sync::OnceLock::new());
        let signalled = deadline.clone();
        let signal = async move {
            shutdown.await;
            let _ = signalled.set(tokio::time::Instant::now() + grace);
            tracing::info!("shutting down: refusing new requests, finishing those in flight");
            draining_state.start_draining();
        };
        let limits = crate::http::server::ConnectionLimits {
            header_timeout: state.settings.http_header_timeout,
            grace,
        };
        let served = crate::http::server::serve(self.listener, app, signal, limits).await;
        if let Some(background) = self.background {
            background.stop_by(deadline.get().copied()).await;
        }
        state.database.close().await;
        served
    }
}

/// The image simulated hosts run, and the commit hash it carries, in `WHIST_CLOUD=local`.
pub const SIMULATED_IMAGE_ID: &str = "sim-image-local";
pub const SIMULATED_COMMIT_HASH: &str = "local-simulated";

/// With simulated hosts there is no release workflow: make the simulated image active in every enabled region that
/// has none, so that the default server can assign mandelboxes at once.
async fn activate_simulated_images(settings: &Settings, services: &Services) {
    let catalog = match services.catalog.load_from_history(CATALOG_ID).await {
        Ok((catalog, _)) => catalog,
        Err(error) => {
            crate::telemetry::log_failure("could not read the image catalog", &error);
            return;
        }
    };
    let missing: BTreeMap<String, String> = settings
        .enabled_regions
        .iter()
        .filter(|region| catalog.active_in(region).is_none())
        .map(|region| (region.clone(), SIMULATED_IMAGE_ID.to_string()))
        .collect();
    if missing.is_empty() {
        return;
    }
    let command = ImageCatalogCommand::Activate {
        client_commit_hash: SIMULATED_COMMIT_HASH.to_string(),
        images: missing,
        at: chrono::Utc::now(),
    };
    let metadata = EventMetadata::new(Actor::System, chrono::Utc::now());
    if let Err(error) = services
        .catalog
        .execute(CATALOG_ID, command, &metadata)
        .await
    {
        tracing::warn!(error = %error, "could not activate the simulated image");
    }
}

type Apis = (
    OpsApi,
    DesktopApi,
    HostApi,
    BillingApi,
    HireFireApi,
    AdminApi,
    OperatorApi,
);

fn api_service() -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            OpsApi,
            DesktopApi,
            HostApi,
            BillingApi,
            HireFireApi,
            AdminApi,
            OperatorApi,
        ),
        "Whist webserver",
        env!("CARGO_PKG_VERSION"),
    )
}

/// Routes served outside the OpenAPI document (Swagger UI's assets), with their methods.
const UNDOCUMENTED_ROUTES: [(&str, &[&str]); 2] = [
    ("/docs/swagger-ui.css", &["GET", "HEAD"]),
    ("/docs/swagger-ui-bundle.js", &["GET", "HEAD"]),
];

/// Every route of the webserver.
pub fn routes(state: AppState) -> impl poem::Endpoint {
    let api = api_service();
    let document = openapi_document();
    let methods = crate::http::openapi::Methods::of(&document, &UNDOCUMENTED_ROUTES);
    let document = document.to_string();
    let docs = swagger_ui(&api);
    Route::new()
        .nest("/", api)
        .at("/dashboard", poem::get(crate::http::dashboard::page))
        .at(
            "/openapi.json",
            poem::get(poem::endpoint::make_sync(move |_| {
                poem::Response::builder()
                    .content_type(crate::http::openapi::JSON)
                    .body(document.clone())
            })),
        )
        .nest("/docs", docs)
        .with(RequestContext::new(state.clone(), methods))
        .data(state)
}

/// `/docs`: Swagger UI over `/openapi.json` (see [`SwaggerUi`]), with its assets beside it.
fn swagger_ui(api: &OpenApiService<Apis, ()>) -> Route {
    let assets = SwaggerUi::from_bundled_page(&api.swagger_ui_html());
    if assets.is_none() {
        // A unit test pins the extraction; should it fail all the same, the page says so in the browser's console.
        tracing::error!(
            "poem-openapi's Swagger UI page has no assets to take: /docs cannot render"
        );
    }
    let asset = |content_type: &'static str, body: Option<bytes::Bytes>| {
        poem::get(poem::endpoint::make_sync(move |_| match &body {
            Some(body) => poem::Response::builder()
                .content_type(content_type)
                .header(poem::http::header::CACHE_CONTROL, "public, max-age=3600")
                .body(body.clone()),
            None => poem::Response::builder()
                .status(poem::http::StatusCode::NOT_FOUND)
                .finish(),
        }))
    };
    Route::new()
        .at(
            "/",
            poem::get(poem::endpoint::make_sync(|_| {
                poem::web::Html(SwaggerUi::PAGE)
            })),
        )
        .at(
            "/swagger-ui.css",
            asset(
                "text/css; charset=utf-8",
                assets.as_ref().map(|assets| assets.css.clone()),
            ),
        )
        .at(
            "/swagger-ui-bundle.js",
            asset(
                "text/javascript; charset=utf-8",
                assets.map(|assets| assets.script),
            ),
        )
}

/// The OpenAPI document served at `/openapi.json` (poem-openapi's, completed by [`crate::http::openapi::complete`]).
pub fn openapi_document() -> serde_json::Value {
    let spec = api_service().spec();
    // The document poem-openapi wrote is JSON; should that ever fail, serve it as written rather than nothing.
    crate::http::openapi::complete(&spec)
        .unwrap_or_else(|_| serde_json::from_str(&spec).unwrap_or(serde_json::Value::Null))
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
///
/// The handlers are installed when this is called, not when the future is first polled: a process polls it beside
/// its server, which may answer its first health check before that, and a SIGTERM in between (a deploy stopping a
/// process that has just come up; seen in CI) took the default action and killed the process without its graceful
/// stop.
pub fn termination_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn received(signal: std::io::Result<Signal>) {
            match signal {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        }
        let terminate = received(signal(SignalKind::terminate()));
        let interrupt = received(signal(SignalKind::interrupt()));
        async move {
            tokio::select! {
                _ = terminate => {},
                _ = interrupt => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
