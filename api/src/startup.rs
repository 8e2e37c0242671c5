//! Building and running a `serve` process.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::{EndpointExt, Route, Server};
use poem_openapi::OpenApiService;
use whist_adapters::config::Settings;
use whist_adapters::store::{Database, DatabaseError};
use whist_projections::ProjectionRunner;

use crate::background::Background;
use crate::middleware::RequestContext;
use crate::ops::OpsApi;
use crate::state::AppState;

/// Options of `whist serve`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Serve HTTP only: no projections, sequencer or (later) reconciler in this process.
    pub api_only: bool,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
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
    acceptor: TcpAcceptor,
    state: AppState,
    background: Option<Background>,
}

/// Opens the store named by the settings and applies the migrations.
///
/// # Errors
/// The store cannot be reached or migrated.
pub async fn open_database(settings: &Settings) -> Result<Database, DatabaseError> {
    let url = settings.database_url.as_ref().map(|url| url.expose());
    let database = Database::connect(url, &settings.data_dir, 20).await?;
    database.migrate().await?;
    tracing::info!(store = database.description(), "event store ready");
    Ok(database)
}

impl Application {
    /// Connects, migrates, starts the background work and binds the port (`PORT`; 0 picks a free one).
    ///
    /// # Errors
    /// The store cannot be reached or migrated, or the port cannot be bound.
    pub async fn build(settings: Settings, options: ServeOptions) -> Result<Self, StartupError> {
        let database = open_database(&settings).await?;
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
        let background =
            (!options.api_only).then(|| Background::start(&database, projections.clone()));
        let port = settings.port;
        let acceptor = TcpListener::bind(format!("0.0.0.0:{port}"))
            .into_acceptor()
            .await
            .map_err(|source| StartupError::Listen { port, source })?;
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|address| address.as_socket_addr().map(|socket| socket.port()))
            .unwrap_or(port);
        let state = AppState::new(Arc::new(settings), database, projections);
        Ok(Self {
            port,
            acceptor,
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

    /// Serves until `shutdown` completes; then refuses new requests with 503, lets those in flight finish (up to
    /// 30 s), stops the background work and returns.
    ///
    /// # Errors
    /// The listener failed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let state = self.state.clone();
        let app = routes(self.state.clone());
        let draining_state = state.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new requests, finishing those in flight");
            draining_state.start_draining();
        };
        let served = Server::new_with_acceptor(self.acceptor)
            .run_with_graceful_shutdown(app, signal, Some(Duration::from_secs(30)))
            .await;
        if let Some(background) = self.background {
            background.stop().await;
        }
        state.database.close().await;
        served
    }
}

/// Every route of the webserver.
pub fn routes(state: AppState) -> impl poem::Endpoint {
    let api = OpenApiService::new(OpsApi, "Whist webserver", env!("CARGO_PKG_VERSION"));
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    Route::new()
        .nest("/", api)
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .with(RequestContext::new(state.clone()))
        .data(state)
}

/// The OpenAPI document, without a server (for the contract test and `whist openapi`).
pub fn openapi_spec() -> String {
    OpenApiService::new(OpsApi, "Whist webserver", env!("CARGO_PKG_VERSION")).spec()
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn termination_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
