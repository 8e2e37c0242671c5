//! The command line.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use whist_adapters::config::Settings;
use whist_api::control::release;
use whist_api::startup::{
    control_plane, open_database, termination_signal, Application, Migrations, ServeOptions,
};
use whist_api::workers::background::Background;
use whist_api::Context;
use whist_projections::{ProjectionRunner, RebuildProgress};

/// The version and the git commit the binary was built from.
const VERSION: &str = whist_api::VERSION;

/// The exit codes, as the top-level help lists them (README.md's "Exit codes" says the same).
const EXIT_CODES: &str = "\
Exit codes:
  0  the command did what was asked
  1  the command failed (the database is unreachable, a decision was refused, ...)
  2  the command line is wrong: an unknown command or option, a missing or malformed value
  3  a verification ran to its end and found a difference (`events verify`, `projections verify`)";

/// The Whist webserver: control plane of the cloud-browser service.
#[derive(Debug, Parser)]
#[command(name = "whist", version = VERSION, about, after_help = EXIT_CODES)]
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
    /// Host image releases (run by the release workflow; see deploy/release-workflow.yml).
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Developers' actions on the fleet (recorded with the developer as actor), for scripts.
    Admin {
        /// The developer's user id (their Auth0 subject), recorded as the actor of every decision.
        #[arg(long = "as", value_name = "USER_ID")]
        developer: String,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Read the event log: list, one aggregate's history or replayed state, export, verify the hash chain.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspect and rebuild projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Print the effective settings, each with where it came from (environment, config database, default), secrets
    /// redacted; exits non-zero, naming the key, on a setting that would stop start-up. Touches no event store.
    Config,
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
enum ImagesCommand {
    /// Phase 1: record the images as protected and inactive, launch a buffer of hosts on them in every region, and
    /// wait until every buffer is ACTIVE (exit 0); on a failed region or the timeout, drain what was started, roll
    /// back, and exit non-zero naming the region. Needs a running `whist serve` or `whist worker` on the same
    /// database (they launch the hosts). Safe to rerun.
    CreateBuffers {
        /// The desktop app's commit hash these images were built for.
        #[arg(long)]
        commit_hash: String,
        /// The release's images: a JSON object of region to AMI id, '{"us-east-1": "ami-…", …}', naming every
        /// enabled region.
        #[arg(long, value_name = "JSON", value_parser = parse_amis)]
        amis: BTreeMap<String, String>,
        /// How long to wait for every buffer to be ACTIVE: `900s`, `15m`, `2h`, or a number of seconds.
        #[arg(long, default_value = "900s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Phase 2: make the release active in every region at once and drain the hosts of older images as their
    /// mandelboxes end. Safe to rerun.
    SwapOver {
        /// The commit hash of the release to make active, as given to `create-buffers`.
        #[arg(long)]
        commit_hash: String,
    },
    /// Undo phase 1 of a release that was not swapped over: its hosts drain and the old release keeps serving.
    Rollback {
        /// The commit hash of the release to undo, as given to `create-buffers`.
        #[arg(long)]
        commit_hash: String,
    },
}

/// A duration on the command line that is not one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like 900s, 15m or 2h")]
struct NotADuration(String);

/// `900s`, `15m`, `2h` or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, NotADuration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((index, _)) => text.split_at(index),
        None => (text, "s"),
    };
    let value: u64 = number.parse().map_err(|_| NotADuration(text.to_string()))?;
    let seconds = match unit {
        "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        _ => return Err(NotADuration(text.to_string())),
    };
    Ok(Duration::from_secs(seconds))
}

/// The help of an aggregate type argument: the types the log holds.
fn aggregate_type_help() -> String {
    format!(
        "The aggregate's type: {}",
        whist_api::control::audit::AGGREGATE_TYPES.join(", ")
    )
}

/// An `--amis` value that is not a JSON object of region to AMI id.
#[derive(Debug, thiserror::Error)]
#[error("must be a JSON object of region to AMI id, like '{{\"us-east-1\": \"ami-…\"}}': {0}")]
struct NotImages(#[source] serde_json::Error);

/// `{"us-east-1": "ami-…", …}`: the images of a release, by region.
fn parse_amis(text: &str) -> Result<BTreeMap<String, String>, NotImages> {
    serde_json::from_str(text).map_err(NotImages)
}

/// An `--as-of` value that is not an RFC 3339 moment.
#[derive(Debug, thiserror::Error)]
#[error("must be an RFC 3339 moment like 2026-01-31T12:00:00Z: {0}")]
struct NotAMoment(#[source] chrono::ParseError);

/// An RFC 3339 moment (`2026-01-31T12:00:00Z`, `2026-01-31T13:00:00+01:00`), in UTC.
fn parse_moment(text: &str) -> Result<chrono::DateTime<chrono::Utc>, NotAMoment> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|moment| moment.with_timezone(&chrono::Utc))
        .map_err(NotAMoment)
}

/// One of the aggregate types the log holds ([`whist_api::control::audit::AGGREGATE_TYPES`]); any other is refused
/// on the command line, naming the known ones.
fn parse_aggregate_type(text: &str) -> Result<String, whist_api::control::audit::AuditError> {
    use whist_api::control::audit::{AuditError, AGGREGATE_TYPES};
    if AGGREGATE_TYPES.contains(&text) {
        Ok(text.to_string())
    } else {
        Err(AuditError::UnknownAggregateType(text.to_string()))
    }
}

/// A projection name that this binary does not have.
#[derive(Debug, thiserror::Error)]
#[error("no projection is named {name:?} (known: {known})")]
struct UnknownProjection {
    name: String,
    known: String,
}

/// The name of one of this binary's projections (`whist projections status` lists them).
fn parse_projection_name(text: &str) -> Result<String, UnknownProjection> {
    let names: Vec<&'static str> = whist_projections::all()
        .iter()
        .map(|projection| projection.name())
        .collect();
    if names.contains(&text) {
        Ok(text.to_string())
    } else {
        Err(UnknownProjection {
            name: text.to_string(),
            known: names.join(", "),
        })
    }
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
    /// Position, head, lag, status and last error of every projection.
    Status,
    /// Rebuild one projection from position 0 and swap it in atomically.
    Rebuild {
        /// The projection's name, as `whist projections status` lists it (e.g. `instances`).
        #[arg(value_parser = parse_projection_name)]
        name: String,
    },
    /// Rebuild one projection into shadow tables at the live model's position and compare; exit 3 on any
    /// difference.
    Verify {
        /// The projection's name, as `whist projections status` lists it (e.g. `instances`).
        #[arg(value_parser = parse_projection_name)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Launch hosts in a region on its active image.
    Launch {
        /// The region to launch in, one of the deployment's enabled regions (e.g. `us-east-1`).
        #[arg(long)]
        region: String,
        /// How many hosts to launch.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Any text naming this launch: run again with the same key, the command launches nothing new and prints
        /// the same instance ids.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Drain a host: no new mandelbox; it shuts down when its last one ends.
    Drain {
        /// The host's instance id, as `whist admin launch` printed it.
        instance_id: String,
    },
    /// Terminate a host (through its host service when it answers, and in the cloud).
    Terminate {
        /// The host's instance id, as `whist admin launch` printed it.
        instance_id: String,
    },
    /// Maintenance mode: `on`, `off` or `status`.
    Maintenance {
        /// `on` pauses new sessions (assigns answer 503, the autoscaler launches nothing), `off` resumes them,
        /// `status` prints the mode.
        #[arg(value_parser = ["on", "off", "status"])]
        switch: String,
    },
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Events of the global log after a position, as JSON Lines.
    List {
        /// The position in the global log to list after (0: from the first event).
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// The most events to list.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Every event of one aggregate, in sequence order, as JSON Lines.
    History {
        #[arg(help = aggregate_type_help(), value_parser = parse_aggregate_type)]
        aggregate_type: String,
        /// The aggregate's id (an instance id, a mandelbox id, a user id, ...).
        aggregate_id: String,
    },
    /// One aggregate's state replayed from its events (all, up to --at-version, or up to --as-of).
    State {
        #[arg(help = aggregate_type_help(), value_parser = parse_aggregate_type)]
        aggregate_type: String,
        /// The aggregate's id (an instance id, a mandelbox id, a user id, ...).
        aggregate_id: String,
        /// Replay the events up to and including this sequence number (the aggregate's version then).
        #[arg(long, conflicts_with = "as_of")]
        at_version: Option<i64>,
        /// Replay the events recorded at or before this moment, in RFC 3339 (`2026-01-31T12:00:00Z`).
        #[arg(long, value_name = "RFC3339", value_parser = parse_moment)]
        as_of: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Every event after --after (default: all) as JSON Lines, streamed; resume with --after the last position.
    Export {
        /// The position in the global log to export after (0: every event); a previous export prints where to
        /// resume.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// The file to write the JSON Lines to, instead of standard output (created or truncated).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Recompute the hash chain over every sealed event; exit 3 naming the first event that does not match.
    Verify,
    /// One chain (every event of one correlation id) as a tree by cause: under each event, the events it caused.
    Trace {
        /// The chain's correlation id: a request's `X-Request-Id`, or a background pass's id.
        correlation_id: String,
    },
    /// Why an event happened: from one event back to its chain's root (the request and its actor, or the
    /// background pass), one line per step.
    Why {
        #[arg(help = aggregate_type_help(), value_parser = parse_aggregate_type)]
        aggregate_type: String,
        /// The aggregate's id (an instance id, a mandelbox id, a user id, ...).
        aggregate_id: String,
        /// The event's sequence number in its aggregate (default: the aggregate's last event).
        #[arg(long)]
        sequence: Option<i64>,
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
    /// Appends/s at 1, 4 and 64 writers and from 1, 2 and 4 processes, and projection rebuild events/s, beside
    /// pgbench one-row inserts.
    Store(crate::bench::StoreBenchOptions),
    /// The autoscaler's decision time over 10,000 hosts and 100,000 mandelboxes, and the reconciler's side effects
    /// per second against an EC2 API (moto on loopback), beside that API's own rate.
    Fleet(crate::bench_fleet::FleetBenchOptions),
    /// The resident memory of a live `whist serve` tracking 100,000 hosts with 1,000,000 allocations in its log.
    Memory(crate::bench_memory::MemoryBenchOptions),
    /// One appending process of `whist bench store --processes` (started by it, not by hand).
    #[command(hide = true)]
    AppendWorker(crate::bench::AppendWorkerOptions),
}

/// How `whist` ends: one exit code each, listed in the top-level help ([`EXIT_CODES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The command did what was asked (0).
    Success,
    /// The command failed (1).
    Failure,
    /// The command line is wrong (2): clap's own refusals and the values our parsers refuse.
    Usage,
    /// A verification ran to its end and found a [`Difference`] (3).
    Difference,
}

impl Exit {
    /// How a command that failed with `error` ends: a [`Difference`] anywhere in its chain is one, any other
    /// error a failure.
    fn of(error: &anyhow::Error) -> Self {
        if error.chain().any(|cause| cause.is::<Difference>()) {
            Self::Difference
        } else {
            Self::Failure
        }
    }

    /// How a command line that clap did not accept ends: `--help` and `--version` succeed, anything else is a
    /// usage error.
    fn of_parse(error: &clap::Error) -> Self {
        if error.use_stderr() {
            Self::Usage
        } else {
            Self::Success
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(match exit {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Difference => 3,
        })
    }
}

/// What a verification found when it ran to its end and the checked thing is not what it should be: not a
/// failure of the command, which did its work, but its answer (exit 3).
#[derive(Debug, thiserror::Error)]
enum Difference {
    /// `whist events verify`: an event no longer matches its seal.
    #[error("the chain is broken at the {0}")]
    BrokenChain(whist_adapters::store::chain::ChainBreak),
    /// `whist projections verify`: the live read model and its rebuild differ.
    #[error("projection {name} differs from its rebuild in {differences} rows")]
    ProjectionDiffers { name: String, differences: i64 },
}

/// Runs the command line; the exit code says how the command ended ([`Exit`]).
pub async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Help and version to standard output, refusals to standard error, as clap's own `exit` does.
            let _ = error.print();
            return Exit::of_parse(&error).into();
        }
    };
    whist_adapters::tls::ensure_crypto_provider();
    whist_api::telemetry::init_logs(match cli.command {
        Command::Loadtest(_) | Command::Bench { .. } => whist_api::telemetry::TOOL_LOGS,
        _ => whist_api::telemetry::SERVER_LOGS,
    });
    let exit = match run(cli).await {
        Ok(()) => Exit::Success,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "whist failed");
            eprintln!("error: {error:#}");
            Exit::of(&error)
        }
    };
    // The spans still waiting in the exporter's batch (it blocks on its own thread, at most a few seconds).
    let _ = tokio::task::spawn_blocking(whist_api::traces::flush).await;
    exit.into()
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
            let state = control_plane(load_settings().await?).await?;
            let mut background = Background::start(&state.database, state.projections.clone());
            background.adopt(Background::start_control(&state));
            tracing::info!("worker running");
            termination_signal().await;
            tracing::info!("worker stopping");
            let grace = state.settings.shutdown_grace;
            background
                .stop_by(Some(tokio::time::Instant::now() + grace))
                .await;
            state.database.close().await;
            Ok(())
        }
        Command::Images { command } => {
            let state = control_plane(load_settings().await?).await?;
            let outcome = images(&state, command).await;
            state.database.close().await;
            outcome
        }
        Command::Admin { developer, command } => {
            let state = control_plane(load_settings().await?).await?;
            let outcome = admin(&state, &whist_domain::Actor::User(developer), command).await;
            state.database.close().await;
            outcome
        }
        Command::Events { command } => {
            let settings = load_settings().await?;
            let database = open_database(&settings, Migrations::Leave).await?;
            let outcome = events(&database, command).await;
            database.close().await;
            outcome
        }
        Command::Migrate => {
            let settings = load_settings().await?;
            let database = open_database(&settings, Migrations::Apply).await?;
            database.close().await;
            println!("migrations applied to {}", database.description());
            Ok(())
        }
        Command::Projections { command } => {
            let settings = load_settings().await?;
            // Reading the status changes nothing, the schema included; verifying and rebuilding write.
            let migrations = match command {
                ProjectionsCommand::Status => Migrations::Leave,
                _ => Migrations::OnStart,
            };
            let database = open_database(&settings, migrations).await?;
            let runner = ProjectionRunner::new(database.clone(), whist_projections::all());
            if migrations != Migrations::Leave {
                runner.register().await?;
            }
            match command {
                ProjectionsCommand::Status => {
                    let statuses = runner.status().await?;
                    println!("{}", serde_json::to_string_pretty(&statuses)?);
                }
                ProjectionsCommand::Verify { name } => {
                    let bar = progress_bar("verifying", &name);
                    let reporter = bar.clone();
                    let report = runner
                        .verify(&name, &move |progress: RebuildProgress| {
                            reporter.set_length(progress.head.max(0) as u64);
                            reporter.set_position(progress.position.max(0) as u64);
                        })
                        .await;
                    bar.finish_and_clear();
                    database.close().await;
                    let report = report?;
                    println!(
                        "verified {name} at position {}: {} events rebuilt in {:.1} s ({:.0} events/s)",
                        report.position,
                        report.events,
                        report.elapsed.as_secs_f64(),
                        report.events_per_second()
                    );
                    for table in &report.tables {
                        println!(
                            "  {}: {} rows; {} only in the live table, {} only in the rebuild",
                            table.table, table.rows, table.only_live, table.only_rebuilt
                        );
                    }
                    println!("diff: {}", report.differences());
                    if report.differences() != 0 {
                        return Err(Difference::ProjectionDiffers {
                            differences: report.differences(),
                            name,
                        }
                        .into());
                    }
                    return Ok(());
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
        Command::Config => {
            let sources = whist_adapters::config::Sources::from_process_environment()
                .with_config_database()
                .await?;
            whist_adapters::config::Settings::from_sources(&sources)?;
            let mut out = std::io::stdout().lock();
            for setting in sources.report() {
                let line = writeln!(
                    out,
                    "{:<36} {:<16} {}",
                    setting.key,
                    setting.origin.as_str(),
                    setting.value
                );
                // A reader that stopped early (`| head`) has seen what it wanted.
                if line.is_err() {
                    break;
                }
            }
            Ok(())
        }
        Command::Loadtest(options) => crate::loadtest::run(options).await,
        Command::Bench { command } => match command {
            BenchCommand::Store(options) => crate::bench::store(options).await,
            BenchCommand::Fleet(options) => crate::bench_fleet::fleet(options).await,
            BenchCommand::Memory(options) => crate::bench_memory::memory(options).await,
            BenchCommand::AppendWorker(options) => crate::bench::append_worker(options).await,
        },
    }
}

async fn images(state: &Context, command: ImagesCommand) -> anyhow::Result<()> {
    // One chain per release command: every decision it takes shares one fresh correlation id.
    let origin =
        &whist_domain::EventMetadata::new(whist_domain::Actor::ReleaseWorkflow, chrono::Utc::now());
    match command {
        ImagesCommand::CreateBuffers {
            commit_hash,
            amis,
            timeout,
        } => {
            let started = Instant::now();
            let mut report = |regions: &[release::RegionProgress]| {
                let line = regions
                    .iter()
                    .map(|region| {
                        let mut text = format!(
                            "{} {}/{} ACTIVE, {} booting",
                            region.region, region.active, region.wanted, region.booting
                        );
                        if !region.failed.is_empty() {
                            text.push_str(&format!(", {} failed", region.failed.len()));
                        }
                        text
                    })
                    .collect::<Vec<_>>()
                    .join(" | ");
                eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
            };
            match release::create_buffers(state, &commit_hash, &amis, timeout, &mut report, origin)
                .await?
            {
                release::Prepared::AlreadyActive => {
                    println!("release {commit_hash} is already active; nothing to do");
                }
                release::Prepared::Ready(regions) => {
                    println!(
                        "release {commit_hash} is ready in {} region(s) after {:.1} s; run `whist images swap-over --commit-hash {commit_hash}`",
                        regions.len(),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Ok(())
        }
        ImagesCommand::SwapOver { commit_hash } => {
            let swapped = release::swap_over(state, &commit_hash, origin).await?;
            let regions = swapped
                .images
                .iter()
                .map(|(region, image)| format!("{region}={image}"))
                .collect::<Vec<_>>()
                .join(", ");
            if swapped.switched {
                println!("release {commit_hash} is active in every region ({regions})");
            } else {
                println!("release {commit_hash} was already active ({regions})");
            }
            println!(
                "hosts of older images: {} draining, {} booting ones terminated",
                swapped.retired.drained, swapped.retired.terminated
            );
            Ok(())
        }
        ImagesCommand::Rollback { commit_hash } => {
            let retired = release::roll_back(state, &commit_hash, origin).await?;
            println!(
                "release {commit_hash} rolled back: {} host(s) draining, {} booting one(s) terminated",
                retired.drained, retired.terminated
            );
            Ok(())
        }
    }
}

async fn admin(
    state: &Context,
    actor: &whist_domain::Actor,
    command: AdminCommand,
) -> anyhow::Result<()> {
    use whist_api::control::operator;
    // One chain for the whole command: its decisions share a fresh correlation id.
    let origin = &whist_domain::EventMetadata::new(actor.clone(), chrono::Utc::now());
    match command {
        AdminCommand::Launch {
            region,
            count,
            idempotency_key,
        } => {
            let ids =
                operator::launch_hosts(state, origin, &region, count, idempotency_key.as_deref())
                    .await?;
            for id in ids {
                println!("{id}");
            }
        }
        AdminCommand::Drain { instance_id } => {
            let status =
                operator::act_on_host(state, origin, &instance_id, operator::HostAction::Drain)
                    .await?;
            println!("{instance_id} {}", status.as_str());
        }
        AdminCommand::Terminate { instance_id } => {
            let status =
                operator::act_on_host(state, origin, &instance_id, operator::HostAction::Terminate)
                    .await?;
            println!("{instance_id} {}", status.as_str());
        }
        AdminCommand::Maintenance { switch } => {
            let enabled = match switch.as_str() {
                "on" => operator::set_maintenance(state, origin, true).await?,
                "off" => operator::set_maintenance(state, origin, false).await?,
                _ => operator::maintenance(state).await?,
            };
            println!("maintenance {}", if enabled { "on" } else { "off" });
        }
    }
    Ok(())
}

/// A progress bar with events/s, drawn on standard error (hidden when it is not a terminal).
fn progress_bar(verb: &str, name: &str) -> Arc<ProgressBar> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {verb} {{msg}} [{{bar:40}}] {{pos}}/{{len}} events ({{per_sec}}, {{eta}} left)"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    Arc::new(bar)
}

async fn events(
    database: &whist_adapters::store::Database,
    command: EventsCommand,
) -> anyhow::Result<()> {
    use std::io::Write;
    use whist_api::control::audit;
    let stdout = std::io::stdout();
    match command {
        EventsCommand::List { after, limit } => {
            let mut out = stdout.lock();
            for event in audit::events_after(database, after, limit).await? {
                writeln!(out, "{}", serde_json::to_string(&event)?)?;
            }
        }
        EventsCommand::History {
            aggregate_type,
            aggregate_id,
        } => {
            let mut out = stdout.lock();
            for event in audit::history(database, &aggregate_type, &aggregate_id).await? {
                writeln!(out, "{}", serde_json::to_string(&event)?)?;
            }
        }
        EventsCommand::State {
            aggregate_type,
            aggregate_id,
            at_version,
            as_of,
        } => {
            let until = audit::ReplayUntil {
                version: at_version,
                as_of,
            };
            match audit::replay(database, &aggregate_type, &aggregate_id, until).await? {
                Some(replayed) => println!("{}", serde_json::to_string_pretty(&replayed)?),
                None => anyhow::bail!("{aggregate_type}/{aggregate_id} has no event that early"),
            }
        }
        EventsCommand::Export { after, output } => {
            let bar = progress_bar("exporting", "the log");
            let reporter = bar.clone();
            let progress = move |position: i64, head: i64| {
                reporter.set_length(head.max(0) as u64);
                reporter.set_position(position.max(0) as u64);
            };
            let report = match output {
                Some(path) => {
                    let file = std::fs::File::create(&path).map_err(|error| {
                        anyhow::anyhow!("cannot write {}: {error}", path.display())
                    })?;
                    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                    audit::export(database, after, &mut out, &progress).await?
                }
                None => {
                    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
                    audit::export(database, after, &mut out, &progress).await?
                }
            };
            bar.finish_and_clear();
            eprintln!(
                "exported {} events up to position {} in {:.1} s ({:.0} events/s); resume with --after {}",
                report.events,
                report.last_position,
                report.elapsed.as_secs_f64(),
                report.events_per_second(),
                report.last_position
            );
        }
        EventsCommand::Verify => {
            let bar = progress_bar("verifying", "the chain");
            let reporter = bar.clone();
            let started = Instant::now();
            let report = whist_adapters::store::chain::verify(database, &move |progress| {
                reporter.set_length(progress.sealed.max(0) as u64);
                reporter.set_position(progress.position.max(0) as u64);
            })
            .await?;
            bar.finish_and_clear();
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "verified {} events in {elapsed:.1} s ({:.0} events/s); sealed up to {} of {}",
                report.verified,
                report.verified as f64 / elapsed.max(1e-9),
                report.sealed,
                report.head
            );
            if let Some(broken) = report.broken {
                return Err(Difference::BrokenChain(broken).into());
            }
        }
        EventsCommand::Trace { correlation_id } => {
            let Some(tree) = audit::trace(database, &correlation_id).await? else {
                anyhow::bail!("no event belongs to the chain {correlation_id:?}");
            };
            let mut out = stdout.lock();
            writeln!(out, "chain {}", tree.correlation_id)?;
            let last = tree.roots.len().saturating_sub(1);
            for (index, root) in tree.roots.iter().enumerate() {
                write_caused(&mut out, root, "", index == last)?;
            }
        }
        EventsCommand::Why {
            aggregate_type,
            aggregate_id,
            sequence,
        } => {
            let Some(walk) = audit::why(database, &aggregate_type, &aggregate_id, sequence).await?
            else {
                let which = sequence.map_or("any event".to_string(), |sequence| {
                    format!("event #{sequence}")
                });
                anyhow::bail!("{aggregate_type}/{aggregate_id} has no {which}");
            };
            let mut out = stdout.lock();
            for (index, step) in walk.steps.iter().enumerate() {
                let lead = if index == 0 { "" } else { "caused by " };
                writeln!(out, "{lead}{}", event_line(step))?;
            }
            match walk.root {
                audit::WalkRoot::Origin {
                    correlation_id,
                    actor,
                } => {
                    let kind = match actor.as_str() {
                        "system" => "background pass",
                        "release-workflow" => "release command",
                        _ => "request",
                    };
                    writeln!(out, "root: {kind} {correlation_id} by {actor}")?;
                }
                audit::WalkRoot::Request(request) => writeln!(out, "root: request {request}")?,
                audit::WalkRoot::Unrecorded => writeln!(
                    out,
                    "root: not recorded (the event predates causes; its chain is {})",
                    walk.steps
                        .last()
                        .map(|step| step.metadata.correlation_id.as_str())
                        .unwrap_or_default()
                )?,
                audit::WalkRoot::Missing(position) => {
                    anyhow::bail!("the walk is broken: no event at position {position}")
                }
            }
        }
    }
    Ok(())
}

/// One event on one line: where it sits, what it is, who recorded it and when.
fn event_line(event: &whist_api::control::audit::EventRecord) -> String {
    format!(
        "#{} {}/{} #{} {} by {} at {}",
        event.position.unwrap_or_default(),
        event.aggregate_type,
        event.aggregate_id,
        event.sequence,
        event.event_type,
        event.metadata.actor,
        event.metadata.recorded_at
    )
}

/// Writes `node` and what it caused as a tree, under `prefix`.
fn write_caused(
    out: &mut impl std::io::Write,
    node: &whist_api::control::audit::CausedEvent,
    prefix: &str,
    last: bool,
) -> std::io::Result<()> {
    let (branch, below) = if last {
        ("└─ ", "   ")
    } else {
        ("├─ ", "│  ")
    };
    writeln!(out, "{prefix}{branch}{}", event_line(&node.event))?;
    let prefix = format!("{prefix}{below}");
    let end = node.caused.len().saturating_sub(1);
    for (index, child) in node.caused.iter().enumerate() {
        write_caused(out, child, &prefix, index == end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_or_without_a_unit() {
        assert_eq!(parse_duration("900s"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn a_malformed_value_is_a_usage_error() {
        for arguments in [
            &[
                "whist", "events", "state", "instance", "i-1", "--as-of", "noon",
            ][..],
            &[
                "whist",
                "images",
                "create-buffers",
                "--commit-hash",
                "c",
                "--amis",
                "[1]",
            ],
            &["whist", "events", "why", "spaceship", "x"],
            &["whist", "projections", "rebuild", "nonsense"],
        ] {
            let error = Cli::try_parse_from(arguments).expect_err("refused");
            assert_eq!(Exit::of_parse(&error), Exit::Usage, "{arguments:?}");
        }
        let help = Cli::try_parse_from(["whist", "--help"]).expect_err("help is not a command");
        assert_eq!(Exit::of_parse(&help), Exit::Success);
    }

    #[test]
    fn a_difference_exits_3_and_any_other_error_1() {
        let difference = anyhow::Error::from(Difference::ProjectionDiffers {
            name: "instances".to_string(),
            differences: 6,
        })
        .context("verifying");
        assert_eq!(Exit::of(&difference), Exit::Difference);
        assert_eq!(
            Exit::of(&anyhow::anyhow!("the database is unreachable")),
            Exit::Failure
        );
    }
}
