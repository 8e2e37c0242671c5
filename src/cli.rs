//! The command line.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use whist_adapters::config::Settings;
use whist_api::background::Background;
use whist_api::services::Services;
use whist_api::startup::{open_database, termination_signal, Application, ServeOptions};
use whist_api::AppState;
use whist_projections::{ProjectionRunner, RebuildProgress};

/// The Whist webserver: control plane of the cloud-browser service.
#[derive(Debug, Parser)]
#[command(name = "whist", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API on PORT, with projections and background work in-process unless --api-only.
    Serve {
        /// Serve HTTP only; leave projections and background work to `whist worker` processes.
        #[arg(long)]
        api_only: bool,
    },
    /// Run projections and background work without the HTTP API (any number may run at once).
    Worker,
    /// Apply migrations/ to DATABASE_URL (or the embedded store) and exit.
    Migrate,
    /// Inspect and rebuild projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Load a live server on Postgres with simulated hosts; print assigns/s, latency and heartbeats/s beside
    /// pgbench.
    Loadtest(crate::loadtest::LoadTestOptions),
    /// Development helpers.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Benchmarks that print figures next to the machine's own Postgres limit.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Position, head, lag, status and last error of every projection.
    Status,
    /// Rebuild one projection from position 0 and swap it in atomically.
    Rebuild {
        /// The projection's name (see `whist projections status`).
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Print a bearer token signed by the local development key; servers accept it only when ENVIRONMENT=local.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Add scope `admin` (a developer).
        #[arg(long)]
        admin: bool,
        /// Hours the token stays valid.
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Appends/s at 1, 4 and 64 writers and projection rebuild events/s, beside pgbench one-row inserts.
    Store(crate::bench::StoreBenchOptions),
    /// The autoscaler's decision time over 10,000 hosts and 100,000 mandelboxes, and the reconciler's side effects
    /// per second against an EC2 API (moto on loopback), beside that API's own rate.
    Fleet(crate::bench_fleet::FleetBenchOptions),
}

/// Runs the command line; the exit code says whether the command succeeded.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    whist_adapters::tls::ensure_crypto_provider();
    whist_api::telemetry::init_logs();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "whist failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn load_settings() -> anyhow::Result<Settings> {
    Ok(Settings::load().await?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { api_only } => {
            let settings = load_settings().await?;
            let application = Application::build(settings, ServeOptions { api_only }).await?;
            tracing::info!(port = application.port(), api_only, "serving");
            application.run_until(termination_signal()).await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Worker => {
            let settings = load_settings().await?;
            let database = open_database(&settings).await?;
            let projections = ProjectionRunner::new(database.clone(), whist_projections::all());
            let services = Arc::new(Services::new(&settings, &database).await?);
            let state = AppState::new(
                Arc::new(settings),
                database.clone(),
                projections.clone(),
                services,
            );
            let mut background = Background::start(&database, projections);
            background.adopt(Background::start_control(&state));
            tracing::info!("worker running");
            termination_signal().await;
            tracing::info!("worker stopping");
            background.stop().await;
            database.close().await;
            Ok(())
        }
        Command::Migrate => {
            let settings = load_settings().await?;
            let database = open_database(&settings).await?;
            database.close().await;
            println!("migrations applied to {}", database.description());
            Ok(())
        }
        Command::Projections { command } => {
            let settings = load_settings().await?;
            let database = open_database(&settings).await?;
            let runner = ProjectionRunner::new(database.clone(), whist_projections::all());
            runner.register().await?;
            match command {
                ProjectionsCommand::Status => {
                    let statuses = runner.status().await?;
                    println!("{}", serde_json::to_string_pretty(&statuses)?);
                }
                ProjectionsCommand::Rebuild { name } => {
                    let bar = ProgressBar::new(0);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} rebuilding {msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_message(name.clone());
                    bar.enable_steady_tick(Duration::from_millis(200));
                    let progress_bar = Arc::new(bar);
                    let reporter = progress_bar.clone();
                    let report = runner
                        .rebuild(&name, &move |progress: RebuildProgress| {
                            reporter.set_length(progress.head.max(0) as u64);
                            reporter.set_position(progress.position.max(0) as u64);
                        })
                        .await?;
                    progress_bar.finish_and_clear();
                    println!(
                        "rebuilt {name}: {} events up to position {} in {:.1} s ({:.0} events/s)",
                        report.events,
                        report.position,
                        report.elapsed.as_secs_f64(),
                        report.events_per_second()
                    );
                }
            }
            database.close().await;
            Ok(())
        }
        Command::Dev {
            command: DevCommand::Token { user, admin, hours },
        } => {
            let token = whist_adapters::auth::dev_token(
                &user,
                admin,
                Duration::from_secs(hours.saturating_mul(3600)),
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Loadtest(options) => crate::loadtest::run(options).await,
        Command::Bench { command } => match command {
            BenchCommand::Store(options) => crate::bench::store(options).await,
            BenchCommand::Fleet(options) => crate::bench_fleet::fleet(options).await,
        },
    }
}
