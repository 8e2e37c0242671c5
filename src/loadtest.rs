//! `whist loadtest`: a live `whist serve` (or several, `--servers`) on a fresh Postgres database with simulated
//! hosts, loaded by 64 desktop clients (assign, then disconnect) and by heartbeating hosts; prints assigns/s with
//! p50/p99 latency and heartbeats/s next to pgbench's one-row insert at the same concurrency on the same server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::Executor;
use whist_adapters::store::{AggregateStore, Database};
use whist_adapters::tokens::{fingerprint, Purpose, Tokens};
use whist_domain::instance::{Instance, InstanceCommand, LaunchSpec};
use whist_domain::{Actor, EventMetadata};

/// Options of `whist loadtest`.
#[derive(Debug, clap::Args)]
pub struct LoadTestOptions {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// Concurrent desktop clients (and heartbeat senders).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of assign load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of heartbeat load.
    #[arg(long, default_value_t = 5)]
    heartbeat_seconds: u64,
    /// `whist serve` processes on the one database; clients and hosts are spread over them in turn. A list
    /// (`1,2`) runs the whole load once per count, back to back, each on a fresh database, then prints each run of
    /// another count against the run of the first count before it (closed loop: assigns/s, machine CPU per assign,
    /// p99, assigns decided more than once; the scale-out targets, with the load generator's own CPU per assign as
    /// a control), and, when one follows (`1,2,1`), against the mean of the runs of the first count before and after
    /// it; over a longer series (`1,2,1,2,1`), the median of each ratio too.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    servers: Vec<usize>,
    /// Simulated hosts in the fleet.
    #[arg(long, default_value_t = 40)]
    hosts: usize,
    /// Mandelbox slots per host.
    #[arg(long, default_value_t = 16)]
    capacity: u32,
    /// After the closed loop, an open loop: assigns sent at this fixed rate (per second) whatever the answers'
    /// speed, each timed from its scheduled send. A number, or `half` for half the closed-loop rate just measured.
    /// With a number, the closed loop is skipped.
    #[arg(long, value_name = "PER_SECOND|half", value_parser = parse_rate)]
    rate: Option<Rate>,
    /// Clients keep what they are assigned instead of disconnecting it at once: assigns alone (with the hosts'
    /// spin-ups and status reports) instead of assign -> disconnect cycles. The fleet must then hold every assign
    /// (hosts x capacity).
    #[arg(long)]
    keep_mandelboxes: bool,
    /// A setting for every server started (`KEY=VALUE`, repeatable), over the load's own: for example
    /// `TOKIO_WORKER_THREADS=1`, or `WHIST_ASSIGN_CONCURRENCY=128`. The load generator itself does not see it.
    #[arg(long = "server-env", value_name = "KEY=VALUE", value_parser = parse_setting)]
    server_env: Vec<(String, String)>,
    /// The servers of a run share the machine's cores as one server has them: each runs
    /// `TOKIO_WORKER_THREADS` = the cores divided by the run's servers (at least 1), instead of a runtime thread
    /// per core each (more runnable threads than cores, which one server per machine, as deployed, never has). A
    /// `--server-env TOKIO_WORKER_THREADS=…` wins over it.
    #[arg(long)]
    share_cores: bool,
}

/// The arrival rate of the open loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// This many assigns per second.
    Fixed(f64),
    /// Half the rate the closed loop reached in the same run.
    HalfOfClosed,
}

/// A `--rate` that is neither a positive number nor `half`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a rate: a positive number of assigns per second, or `half`")]
pub struct NotARate(String);

fn parse_rate(text: &str) -> Result<Rate, NotARate> {
    if text == "half" {
        return Ok(Rate::HalfOfClosed);
    }
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(Rate::Fixed(rate)),
        _ => Err(NotARate(text.to_string())),
    }
}

/// A `--server-env` that is not `KEY=VALUE` with a key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a setting: KEY=VALUE")]
pub struct NotASetting(String);

fn parse_setting(text: &str) -> Result<(String, String), NotASetting> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(NotASetting(text.to_string())),
    }
}

/// When the desktop app retries an assign answered 429 (the server's `Retry-After: 1`).
const SHED_RETRY: Duration = Duration::from_secs(1);

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn run(options: LoadTestOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        !options.servers.is_empty() && options.servers.iter().all(|&count| count >= 1),
        "--servers must be at least 1"
    );
    let mut runs = Vec::new();
    for (index, &servers) in options.servers.iter().enumerate() {
        if index > 0 {
            println!();
        }
        let scratch =
            crate::bench::ScratchDatabase::create(&options.server.database_url, "whist_load")
                .await?;
        let outcome = load(&options, servers, &scratch.url).await;
        scratch.drop_it().await?;
        runs.push(outcome?);
    }
    if runs.len() > 1 {
        println!();
        for line in compare_runs(&runs) {
            println!("{line}");
        }
    }
    Ok(())
}

/// What one run's closed loop came to, for comparing server counts.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RunSummary {
    servers: usize,
    /// `None` when the run had no closed loop (`--rate N`).
    closed: Option<ClosedFigures>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct ClosedFigures {
    rate: f64,
    /// Seconds of machine CPU per assign, when the machine's CPU could be read.
    cpu_per_assign: Option<f64>,
    /// Seconds of the load generator's own CPU (with its simulated hosts) per assign: the same work whatever the
    /// number of servers, so its ratio between two runs is the machine's own drift and contention, a control.
    generator_cpu_per_assign: Option<f64>,
    p99_ms: f64,
    /// Share of assigns the servers decided more than once (lost their first attempt), when they counted.
    retried: Option<f64>,
}

impl ClosedFigures {
    /// The mean of two runs' figures, as a baseline. The share retried is `self`'s: a comparison reads only the
    /// share of the run it holds against the baseline.
    fn mean_with(self, other: Self) -> Self {
        Self {
            rate: (self.rate + other.rate) / 2.0,
            cpu_per_assign: self
                .cpu_per_assign
                .zip(other.cpu_per_assign)
                .map(|(one, two)| (one + two) / 2.0),
            generator_cpu_per_assign: self
                .generator_cpu_per_assign
                .zip(other.generator_cpu_per_assign)
                .map(|(one, two)| (one + two) / 2.0),
            p99_ms: (self.p99_ms + other.p99_ms) / 2.0,
            retried: self.retried,
        }
    }
}

/// Each run of another server count against the run of the first count before it, with the scale-out targets:
/// assigns/s >= 90%, machine CPU per assign <= 1.2x, p99 <= 1.5x, assigns decided more than once <= 5%. When a
/// run of the first count follows it too (`--servers 1,2,1`), also against the mean of the two around it: a
/// machine whose speed drifts steadily across the three moves both sides of that comparison alike. When the series
/// holds two runs of another count or more (`--servers 1,2,1,2,1`), the median of each ratio over them, each run
/// against its closest baseline (the mean around it where there is one): on a machine whose speed swings from
/// one run to the next, a single pair says more about the swing than about the servers.
fn compare_runs(runs: &[RunSummary]) -> Vec<String> {
    let Some(first) = runs.first().map(|run| run.servers) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    let mut baseline: Option<&RunSummary> = None;
    let mut held: Vec<(usize, Held)> = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        if run.servers == first {
            baseline = Some(run);
            continue;
        }
        let Some(base) = baseline else { continue };
        lines.push(format!(
            "-- {} servers against {} (closed loop, back to back) --",
            run.servers, base.servers
        ));
        let (Some(one), Some(many)) = (base.closed, run.closed) else {
            lines.push("n/a: a run had no closed loop".to_string());
            continue;
        };
        let back_to_back = hold_against(&mut lines, one, many);
        let after = runs[index + 1..]
            .iter()
            .find(|later| later.servers == first)
            .and_then(|later| later.closed);
        let closest = match after {
            Some(after) => {
                lines.push(format!(
                    "-- {} servers against the mean of the runs of {} before and after it --",
                    run.servers, base.servers
                ));
                hold_against(&mut lines, one.mean_with(after), many)
            }
            None => back_to_back,
        };
        held.push((run.servers, closest));
    }
    // One summary per other count (`1,2,4,1,2,4,1` gives one for 2 and one for 4).
    let mut counts: Vec<usize> = held.iter().map(|(servers, _)| *servers).collect();
    counts.sort_unstable();
    counts.dedup();
    for servers in counts {
        let of_count: Vec<Held> = held
            .iter()
            .filter(|(count, _)| *count == servers)
            .map(|(_, held)| *held)
            .collect();
        if of_count.len() >= 2 {
            summarise_series(&mut lines, first, servers, &of_count);
        }
    }
    lines
}

/// One run held against its baseline: the ratios and whether each target held.
#[derive(Debug, Clone, Copy)]
struct Held {
    rate: f64,
    cpu: Option<f64>,
    generator_cpu: Option<f64>,
    p99: f64,
    retried: Option<f64>,
    every: bool,
}

/// The median of each ratio over a series of comparisons, with its range, each held against its target.
fn summarise_series(lines: &mut Vec<String>, first: usize, servers: usize, held: &[Held]) {
    let holds = |held: bool| if held { "holds" } else { "misses" };
    lines.push(format!(
        "-- the series: {} runs of {servers} servers, each against the mean of the runs of {first} around it (or the \
         run before it), median (lowest-highest) --",
        held.len()
    ));
    let rates: Vec<f64> = held.iter().map(|held| held.rate).collect();
    let (rate, rate_low, rate_high) = median_and_range(&rates);
    lines.push(format!(
        "{:<36} {:>6.0}% ({:.0}-{:.0}%; target >= 90%: {})",
        "assigns/s",
        100.0 * rate,
        100.0 * rate_low,
        100.0 * rate_high,
        holds(rate >= 0.9)
    ));
    let cpus: Option<Vec<f64>> = held.iter().map(|held| held.cpu).collect();
    let cpu_held = cpus.map(|cpus| {
        let (cpu, low, high) = median_and_range(&cpus);
        lines.push(format!(
            "{:<36} {:>6.2}x ({low:.2}-{high:.2}x; target <= 1.2x: {})",
            "machine CPU per assign",
            cpu,
            holds(cpu <= 1.2)
        ));
        cpu <= 1.2
    });
    if cpu_held.is_none() {
        lines.push(not_measured("machine CPU per assign"));
    }
    let generator: Option<Vec<f64>> = held.iter().map(|held| held.generator_cpu).collect();
    if let Some(generator) = generator {
        let (ratio, low, high) = median_and_range(&generator);
        lines.push(format!(
            "{:<36} {:>6.2}x ({low:.2}-{high:.2}x; control, no target)",
            "load generator's CPU per assign", ratio
        ));
    }
    let p99s: Vec<f64> = held.iter().map(|held| held.p99).collect();
    let (p99, p99_low, p99_high) = median_and_range(&p99s);
    lines.push(format!(
        "{:<36} {:>6.2}x ({p99_low:.2}-{p99_high:.2}x; target <= 1.5x: {})",
        "assign latency p99",
        p99,
        holds(p99 <= 1.5)
    ));
    let retried: Option<Vec<f64>> = held.iter().map(|held| held.retried).collect();
    let retried_held = retried.map(|retried| {
        let (share, low, high) = median_and_range(&retried);
        lines.push(format!(
            "{:<36} {:>6.1}% ({:.1}-{:.1}%; target <= 5%: {})",
            "assigns decided more than once",
            100.0 * share,
            100.0 * low,
            100.0 * high,
            holds(share <= 0.05)
        ));
        share <= 0.05
    });
    if retried_held.is_none() {
        lines.push(not_measured("assigns decided more than once"));
    }
    let on_medians =
        rate >= 0.9 && cpu_held.unwrap_or(false) && p99 <= 1.5 && retried_held.unwrap_or(false);
    lines.push(format!(
        "{:<36} {:>7} (in {} of {} runs alone)",
        "every condition, on the medians",
        if on_medians { "yes" } else { "no" },
        held.iter().filter(|held| held.every).count(),
        held.len()
    ));
}

/// The line of a ratio a run could not measure (the machine's CPU where `/proc` cannot be read; decisions made more
/// than once where the servers' metrics counted no assign).
fn not_measured(caption: &str) -> String {
    format!("{caption:<36} {:>7}", "n/a")
}

/// The median (the mean of the middle two of an even count), the lowest and the highest of `values`.
fn median_and_range(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some((&low, &high)) = sorted.first().zip(sorted.last()) else {
        return (0.0, 0.0, 0.0);
    };
    let middle = sorted.len() / 2;
    let median = if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    };
    (median, low, high)
}

/// The lines that hold the figures `many` against `one`, each target checked once.
fn hold_against(lines: &mut Vec<String>, one: ClosedFigures, many: ClosedFigures) -> Held {
    let rate = many.rate / one.rate.max(1e-9);
    let cpu = one
        .cpu_per_assign
        .zip(many.cpu_per_assign)
        .map(|(one, many)| many / one.max(1e-12));
    let generator_cpu = one
        .generator_cpu_per_assign
        .zip(many.generator_cpu_per_assign)
        .map(|(one, many)| many / one.max(1e-12));
    let p99 = many.p99_ms / one.p99_ms.max(1e-9);
    // Each target is checked once: its line says it, and every condition at once is all of them.
    let (rate_held, cpu_held, p99_held, retried_held) = (
        rate >= 0.9,
        cpu.map(|cpu| cpu <= 1.2),
        p99 <= 1.5,
        many.retried.map(|retried| retried <= 0.05),
    );
    let holds = |held: bool| if held { "holds" } else { "misses" };
    lines.push(format!(
        "{:<36} {:>6.0}% ({:.0}/s against {:.0}/s; target >= 90%: {})",
        "assigns/s",
        100.0 * rate,
        many.rate,
        one.rate,
        holds(rate_held)
    ));
    match cpu.zip(cpu_held) {
        Some((cpu, held)) => lines.push(format!(
            "{:<36} {:>6.2}x (target <= 1.2x: {})",
            "machine CPU per assign",
            cpu,
            holds(held)
        )),
        None => lines.push(not_measured("machine CPU per assign")),
    }
    if let Some(generator_cpu) = generator_cpu {
        lines.push(format!(
            "{:<36} {:>6.2}x (control, no target: the same work in both runs)",
            "load generator's CPU per assign", generator_cpu
        ));
    }
    lines.push(format!(
        "{:<36} {:>6.2}x (target <= 1.5x: {})",
        "assign latency p99",
        p99,
        holds(p99_held)
    ));
    match many.retried.zip(retried_held) {
        Some((retried, held)) => lines.push(format!(
            "{:<36} {:>6.1}% (target <= 5%: {})",
            "assigns decided more than once",
            100.0 * retried,
            holds(held)
        )),
        None => lines.push(not_measured("assigns decided more than once")),
    }
    let every = rate_held && cpu_held.unwrap_or(false) && p99_held && retried_held.unwrap_or(false);
    lines.push(format!(
        "{:<36} {:>7}",
        "every condition at once",
        if every { "yes" } else { "no" }
    ));
    Held {
        rate,
        cpu,
        generator_cpu,
        p99,
        retried: many.retried,
        every,
    }
}

/// The `fraction` percentile of `sorted` durations, in milliseconds (0 when there are none).
fn percentile_ms(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 * fraction) as usize).min(sorted.len().saturating_sub(1));
    sorted
        .get(index)
        .map_or(0.0, |duration| duration.as_secs_f64() * 1000.0)
}

/// Where the server's log goes: the file named by `WHIST_LOADTEST_SERVER_LOG`, else nowhere.
fn server_log() -> anyhow::Result<std::process::Stdio> {
    Ok(match std::env::var_os("WHIST_LOADTEST_SERVER_LOG") {
        Some(path) => std::fs::File::create(&path)
            .with_context(|| format!("Failed to create the server log {}", path.to_string_lossy()))?
            .into(),
        None => std::process::Stdio::null(),
    })
}

/// The same file again, for the server's standard error.
fn server_log_append() -> anyhow::Result<std::process::Stdio> {
    Ok(match std::env::var_os("WHIST_LOADTEST_SERVER_LOG") {
        Some(path) => std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("Failed to open the server log {}", path.to_string_lossy()))?
            .into(),
        None => std::process::Stdio::null(),
    })
}

/// The webhook secret the load test's server takes; the load test plays Stripe to make its users subscribers.
const LOAD_WEBHOOK_SECRET: &str = "whsec_loadtest";

/// Makes `user_id` a subscriber through signed webhooks, as Stripe would.
async fn subscribe(client: &reqwest::Client, base: &str, user_id: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp();
    let customer = format!(
        "cus_load_{}",
        user_id.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    let events = [
        serde_json::json!({"id": format!("evt_link_{customer}"), "type": "checkout.session.completed",
            "created": now, "data": {"object": {"id": format!("cs_{customer}"), "customer": customer,
            "client_reference_id": user_id}}}),
        serde_json::json!({"id": format!("evt_sub_{customer}"), "type": "customer.subscription.created",
            "created": now, "data": {"object": {"id": format!("sub_{customer}"), "customer": customer,
            "status": "active"}}}),
    ];
    for event in events {
        let payload = event.to_string();
        let signature = whist_adapters::stripe::sign_webhook(&payload, LOAD_WEBHOOK_SECRET, now);
        let status = client
            .post(format!("{base}/stripe/webhook"))
            .header("Stripe-Signature", signature)
            .header("Content-Type", "application/json")
            .body(payload)
            .send()
            .await?
            .status();
        anyhow::ensure!(status.is_success(), "the webhook answered {status}");
    }
    Ok(())
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts one `whist serve` on `url`, listening on `port`, whose hosts listen on `host_port`.
fn start_server(
    url: &str,
    port: u16,
    host_port: u16,
    aws_endpoint: &str,
    data_dir: &std::path::Path,
    capacity: u32,
    settings: &[(String, String)],
) -> anyhow::Result<Server> {
    Ok(Server(
        std::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .current_dir(data_dir)
            .env("DATABASE_URL", url)
            .env("PORT", port.to_string())
            .env("WHIST_CLOUD", "aws")
            // Local: the load test's clients sign in with development tokens.
            .env("ENVIRONMENT", "local")
            .env("WHIST_DEPLOYMENT", "whist-loadtest")
            // The load test's simulated hosts listen on loopback.
            .env("HOST_NETWORK_CIDRS", r#"["127.0.0.0/8"]"#)
            // `--capacity` may exceed the default bound on what one host may declare.
            .env("MAX_MANDELBOX_CAPACITY", capacity.max(64).to_string())
            .env("WHIST_AUTOSCALE", "false")
            // The load test starts the hosts itself; EC2 is never called for real: its endpoint is a loopback port
            // nothing listens on.
            .env("AWS_ENDPOINT_URL", aws_endpoint)
            .env("AWS_ACCESS_KEY_ID", "loadtest")
            .env("AWS_SECRET_ACCESS_KEY", "loadtest")
            .env("HOST_SERVICE_PORT", host_port.to_string())
            .env("ASSIGN_RATE_LIMIT_PER_MINUTE", "0")
            .env("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0")
            .env("MANDELBOX_LIMIT_PER_USER", "1000")
            .env("STRIPE_WEBHOOK_SECRET", LOAD_WEBHOOK_SECRET)
            .env("RUST_LOG", "warn")
            .envs(settings.iter().map(|(key, value)| (key, value)))
            .stdout(server_log()?)
            .stderr(server_log_append()?)
            .spawn()
            .context("Failed to start whist serve")?,
    ))
}

/// The settings every server of a run of `server_count` gets: `--server-env`'s and, with `--share-cores`, a share
/// of the machine's `cores` for each server's runtime.
fn server_settings(
    options: &LoadTestOptions,
    server_count: usize,
    cores: usize,
) -> Vec<(String, String)> {
    let mut settings = options.server_env.clone();
    if options.share_cores && !settings.iter().any(|(key, _)| key == WORKER_THREADS) {
        let share = (cores / server_count.max(1)).max(1);
        settings.push((WORKER_THREADS.to_string(), share.to_string()));
    }
    settings
}

/// The setting of a tokio runtime's worker threads (a thread per core without it).
const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

/// The cores this process may run on (1 when that cannot be told).
fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// One whole run with `servers` processes: prints its report and returns its closed loop's figures.
async fn load(
    options: &LoadTestOptions,
    server_count: usize,
    url: &str,
) -> anyhow::Result<RunSummary> {
    let host_port = free_port()?;
    let aws_endpoint = format!("http://127.0.0.1:{}", free_port()?);
    let data_dir = std::env::temp_dir().join(format!("whist-load-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;
    let settings = server_settings(options, server_count, machine_cores());
    let mut ports = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..server_count {
        let port = free_port()?;
        servers.push(start_server(
            url,
            port,
            host_port,
            &aws_endpoint,
            &data_dir,
            options.capacity,
            &settings,
        )?);
        ports.push(port);
    }
    let bases: Vec<String> = ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    let base = bases[0].clone();
    // The open loop may hold many more assigns in flight than there are clients: keep their connections too.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients.max(1024))
        .build()?;
    let started = Instant::now();
    for base in &bases {
        loop {
            if client.get(format!("{base}/healthz")).send().await.is_ok() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the server did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The fleet.
    let database = Database::connect(
        Some(url),
        &data_dir,
        whist_adapters::store::PoolSettings::sized(4),
    )
    .await?;
    // The load tool decides nothing from remembered copies: its own log follower would only read every event's key
    // again beside the servers' (about a tenth of the machine's reads of the log), and count as the system's CPU.
    database.following().stop();
    let tokens = Tokens::load(&database).await?;
    let instances = AggregateStore::<Instance>::new(&database, ());
    let spec = LaunchSpec {
        region: "us-east-1".to_string(),
        image_id: "ami-load".to_string(),
        client_commit_hash: "load".to_string(),
        instance_type: "g4dn.2xlarge".to_string(),
    };
    let mut hosts = Vec::new();
    let mut host_ids = Vec::new();
    for host_index in 0..options.hosts {
        let instance_id = uuid::Uuid::new_v4().to_string();
        let bootstrap = tokens.derive(Purpose::Bootstrap, &instance_id);
        instances
            .execute(
                &instance_id,
                InstanceCommand::RequestLaunch {
                    spec: spec.clone(),
                    bootstrap_token_hash: fingerprint(&bootstrap),
                    reason: whist_domain::instance::LaunchReason::Operator,
                    at: chrono::Utc::now(),
                },
                &EventMetadata::new(Actor::System, chrono::Utc::now()),
            )
            .await?;
        hosts.push(
            whist_adapters::simulated_host::start(
                whist_adapters::simulated_host::SimulatedHostSpec {
                    instance_id: instance_id.clone(),
                    bootstrap_token: bootstrap,
                    webserver_url: bases[host_index % bases.len()].clone(),
                    region: spec.region.clone(),
                    image_id: spec.image_id.clone(),
                    instance_type: spec.instance_type.clone(),
                    client_commit_hash: spec.client_commit_hash.clone(),
                    mandelbox_capacity: options.capacity,
                    port: host_port,
                    tls: whist_adapters::simulated_host::HostTls::SelfSigned,
                },
            )
            .await?,
        );
        host_ids.push(instance_id);
    }
    let started = Instant::now();
    loop {
        let active: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instances WHERE status = 'ACTIVE'")
                .fetch_one(database.any())
                .await?;
        if active as usize >= options.hosts {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the fleet did not register"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every load user is a subscriber, as Stripe said so.
    for client_index in 0..options.clients {
        subscribe(&client, &base, &format!("load-user-{client_index}")).await?;
    }

    // Assign load: closed loop (every client assigns, then disconnects what it got, then assigns again), then, with
    // `--rate`, open loop (assigns sent at a fixed arrival rate whatever the answers' speed).
    let server_pids: Vec<u32> = servers.iter().map(|server| server.0.id()).collect();
    let users = Users::new(options.clients);
    // Statements per assign, where Postgres keeps statement statistics.
    Statements::enable(&database).await;
    let load = AssignLoad {
        client: &client,
        database: &database,
        bases: &bases,
        tokens: &tokens,
        users: &users,
        keep: options.keep_mandelboxes,
        seconds: options.seconds,
    };
    let head_before = log_head(&database).await?;
    let closed = match options.rate {
        Some(Rate::Fixed(_)) => None,
        _ => Some(load.closed_loop(options.clients, &server_pids).await?),
    };
    let open_rate = match options.rate {
        None => None,
        Some(Rate::Fixed(rate)) => Some(rate),
        Some(Rate::HalfOfClosed) => closed.as_ref().map(|phase| phase.rate() / 2.0),
    };
    let open = match open_rate {
        Some(rate) => Some(load.open_loop(rate, &server_pids).await?),
        None => None,
    };
    // Side effects the reconciler has not carried out yet: a backlog that grows over the phase means assigns
    // came faster than the spin-ups they need can be handled, i.e. above the sustainable rate.
    let jobs_waiting: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')")
            .fetch_one(database.any())
            .await?;

    // Heartbeat load.
    let heartbeats = Arc::new(AtomicU64::new(0));
    let heartbeat_failures = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(options.heartbeat_seconds);
    let cpu_before = CpuTimes::read(&server_pids);
    let heartbeat_started = Instant::now();
    let mut tasks = Vec::new();
    for sender in 0..options.clients {
        let address: std::net::SocketAddr = ([127, 0, 0, 1], ports[sender % ports.len()]).into();
        // Each sender is one host's connection; its bearer token is derived once, as a host does.
        let senders_hosts: Vec<(String, String)> = host_ids
            .iter()
            .cycle()
            .skip(sender % host_ids.len().max(1))
            .take(host_ids.len())
            .map(|instance_id| {
                (
                    instance_id.clone(),
                    format!("Bearer {}", tokens.derive(Purpose::HostAuth, instance_id)),
                )
            })
            .collect();
        let heartbeats = heartbeats.clone();
        let failures = heartbeat_failures.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(error) =
                send_heartbeats(address, &senders_hosts, deadline, &heartbeats).await
            {
                failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("a heartbeat sender stopped: {error:#}");
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let heartbeat_rate =
        heartbeats.load(Ordering::Relaxed) as f64 / heartbeat_started.elapsed().as_secs_f64();
    let cpu_heartbeats = CpuTimes::read(&server_pids)
        .zip(cpu_before)
        .map(|(after, before)| after.since(&before));
    // The servers' own view: time spent inside assign, and command outcomes (conflicts show contention).
    let mut server_metrics = Vec::new();
    for base in &bases {
        server_metrics.push(
            client
                .get(format!("{base}/metrics"))
                .send()
                .await?
                .text()
                .await
                .unwrap_or_default(),
        );
    }
    // Every event the assign phase caused has been sequenced by now (the heartbeat phase records none).
    let events_recorded = log_head(&database).await? - head_before;
    drop(hosts);
    drop(servers);
    database.close().await;

    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    pool.execute("CREATE TABLE IF NOT EXISTS pgbench_one_row (id bigserial PRIMARY KEY, payload text NOT NULL)")
        .await?;
    pool.close().await;
    let machine_before = CpuTimes::read(&[std::process::id()]);
    let pgbench_started = Instant::now();
    let pgbench =
        crate::bench::pgbench_one_row_insert(url, options.clients, options.seconds.min(10))?;
    let pgbench_elapsed = pgbench_started.elapsed().as_secs_f64();
    let cpu_per_insert = CpuTimes::read(&[std::process::id()])
        .zip(machine_before)
        .map(|(after, before)| after.since(&before).machine / (pgbench * pgbench_elapsed).max(1.0));
    let threads = settings
        .iter()
        .find(|(key, _)| key == WORKER_THREADS)
        .map(|(_, threads)| format!(" of {threads} runtime thread(s) each"))
        .unwrap_or_default();
    println!(
        "whist loadtest: {} server(s){threads}, {} clients, {} hosts x {} slots, {} s of assigns per phase, {} s of heartbeats",
        server_count,
        options.clients,
        options.hosts,
        options.capacity,
        options.seconds,
        options.heartbeat_seconds
    );
    println!("{:<36} {:>14}", "measure", "figure");
    let what = if options.keep_mandelboxes {
        "assign, kept"
    } else {
        "assign, then disconnect"
    };
    if let Some(phase) = &closed {
        println!(
            "-- closed loop: {} clients, each {what}, again --",
            options.clients
        );
        phase.print(cpu_per_insert, "latency");
    }
    if let (Some(phase), Some(rate)) = (&open, open_rate) {
        println!(
            "-- open loop: {rate:.0} assigns/s sent on schedule ({what}); answer time from the scheduled send --"
        );
        phase.print(cpu_per_insert, "answer");
    }
    println!("-- heartbeats, {} senders --", options.clients);
    println!("{:<36} {:>12.0}/s", "heartbeats ingested", heartbeat_rate);
    println!(
        "{:<36} {:>14}",
        "heartbeat senders failed",
        heartbeat_failures.load(Ordering::Relaxed)
    );
    if let Some(cpu) = cpu_heartbeats {
        println!(
            "{:<36} {:>11.3} ms (server {:.0}%, load generator {:.0}%)",
            "machine CPU per heartbeat",
            1000.0 * cpu.machine / (heartbeat_rate * options.heartbeat_seconds as f64).max(1.0),
            100.0 * cpu.server / cpu.machine.max(1e-9),
            100.0 * cpu.generator / cpu.machine.max(1e-9),
        );
    }
    println!("-- the log and the machine --");
    let assigned_count = closed
        .iter()
        .chain(open.iter())
        .map(|phase| phase.assigned)
        .sum::<u64>()
        .max(1) as f64;
    println!(
        "{:<36} {:>14}",
        "jobs waiting as assigns stopped", jobs_waiting
    );
    println!(
        "{:<36} {:>14.1}",
        "events recorded per assign",
        events_recorded as f64 / assigned_count
    );
    // What the shape of the work allows: every recorded decision (a unit: one command's events, or an assign's
    // four aggregates together) is one all-or-nothing append.
    let units = metric_total(&server_metrics, "whist_append_batch_units_sum");
    let statements = metric_total(&server_metrics, "whist_append_batch_units_count");
    if let (Some(units), Some(statements)) = (units, statements) {
        println!(
            "{:<36} {:>14.2}",
            "decisions recorded per assign",
            units / assigned_count
        );
        println!(
            "{:<36} {:>14.1}",
            "decisions per append statement",
            units / statements.max(1.0)
        );
    }
    // Aggregates read from the database rather than served from memory (a cold load, a snapshot's tail, or a
    // remembered copy's catch-up), and why copies were marked behind the store, per assign.
    for (metric, caption) in [
        ("whist_aggregate_loads_total", "loads per assign"),
        (
            "whist_copies_marked_stale_total",
            "copies marked stale per assign",
        ),
    ] {
        print_per_assign(&server_metrics, metric, caption, assigned_count);
    }
    println!(
        "{:<36} {:>12.0}/s",
        format!("pgbench one-row insert, {} clients", options.clients),
        pgbench
    );
    if let Some(per_insert) = cpu_per_insert {
        println!(
            "{:<36} {:>11.3} ms",
            "machine CPU per pgbench insert",
            per_insert * 1000.0
        );
    }
    if let Some(phase) = &closed {
        println!(
            "{:<36} {:>13.0}%",
            "closed-loop assigns / pgbench",
            100.0 * phase.rate() / pgbench.max(1e-9)
        );
    }
    println!(
        "(targets: CPU per assign <= 10 pgbench inserts; open loop at half the closed-loop rate p50 <= 5 ms, \
         p99 <= 20 ms; heartbeats >= 20000/s; 2 servers >= 90% of 1: --servers 1,2)"
    );
    Ok(RunSummary {
        servers: server_count,
        closed: closed.as_ref().map(Phase::figures),
    })
}

/// An unlabelled metric summed over several servers' metrics (`None` when no server has it).
fn metric_total(texts: &[String], name: &str) -> Option<f64> {
    texts
        .iter()
        .filter_map(|text| metric_value(text, name))
        .fold(None, |total, value| Some(total.unwrap_or(0.0) + value))
}

/// The value of an unlabelled metric in Prometheus's text format (a summary's `_sum` or `_count`, say).
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name)
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// The load's users (all subscribers), with the bearer token each signs in with.
struct Users {
    tokens: Vec<String>,
}

impl Users {
    fn new(count: usize) -> Self {
        let tokens = (0..count.max(1))
            .map(|index| {
                whist_adapters::auth::dev_token(
                    &format!("load-user-{index}"),
                    false,
                    Duration::from_secs(3600),
                )
                .unwrap_or_default()
            })
            .collect();
        Self { tokens }
    }

    fn token(&self, index: usize) -> &str {
        &self.tokens[index % self.tokens.len()]
    }
}

/// How one assign was answered.
enum Answer {
    /// 200, with the mandelbox's id.
    Assigned(String),
    /// 503 `NO_INSTANCE_AVAILABLE`.
    Refused,
    /// 429: more assigns at once than the server takes (`WHIST_ASSIGN_CONCURRENCY`; the load's rate limits are off).
    Shed,
    /// Anything else, or no answer.
    Failed,
}

/// What one phase of assign load came to.
struct Phase {
    sent: u64,
    assigned: u64,
    refused: u64,
    shed: u64,
    failed: u64,
    /// Sorted: each assign's latency (closed loop) or answer time from its scheduled send (open loop).
    latencies: Vec<Duration>,
    /// Sorted, as `latencies` but with each 429 a second later (when the app retries it); empty without 429s.
    with_retries: Vec<Duration>,
    elapsed: f64,
    cpu: Option<CpuTimes>,
    /// Assigns the servers decided more than once, and all assigns they counted, over the phase.
    retried: f64,
    counted: f64,
    /// Open loop, sorted: how late each assign left after its scheduled time (the generator, or the machine under
    /// it, fell behind). Empty for a closed loop.
    lateness: Vec<Duration>,
    most_in_flight: u64,
    /// Open loop: answers slower than [`SLOW_ANSWER`] (the p99 target), by second of the schedule. A stall shows as
    /// a second or two of many; a rate above what the servers sustain, as counts that grow to the end. Empty for a
    /// closed loop.
    slow_by_second: Vec<u64>,
    /// Open loop: when its schedule began (UTC), to find a stall's second in other logs (Postgres's, the servers').
    schedule_began: Option<chrono::DateTime<chrono::Utc>>,
    /// Statements the server processes ran over the phase (`pg_stat_statements`), when Postgres keeps them.
    statements: Option<Statements>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.assigned as f64 / self.elapsed.max(1e-9)
    }

    fn figures(&self) -> ClosedFigures {
        ClosedFigures {
            rate: self.rate(),
            cpu_per_assign: self
                .cpu
                .map(|cpu| cpu.machine / self.assigned.max(1) as f64),
            generator_cpu_per_assign: self
                .cpu
                .map(|cpu| cpu.generator / self.assigned.max(1) as f64),
            p99_ms: self.percentile(0.99),
            retried: (self.counted > 0.0).then(|| self.retried / self.counted),
        }
    }

    fn percentile(&self, fraction: f64) -> f64 {
        percentile_ms(&self.latencies, fraction)
    }

    fn print(&self, cpu_per_insert: Option<f64>, timed: &str) {
        println!("{:<36} {:>12.0}/s", "assigns answered 200", self.rate());
        println!(
            "{:<36} {:>14}",
            "sent / 200 / refused / 429 / failed",
            format!(
                "{} / {} / {} / {} / {}",
                self.sent, self.assigned, self.refused, self.shed, self.failed
            )
        );
        for (label, fraction) in [("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)] {
            println!(
                "{:<36} {:>11.1} ms",
                format!("assign {timed} {label}"),
                self.percentile(fraction)
            );
        }
        if !self.with_retries.is_empty() {
            println!(
                "{:<36} {:>11.1} ms (each 429 as its retry, {} s later)",
                format!("assign {timed} p99, 429s retried"),
                percentile_ms(&self.with_retries, 0.99),
                SHED_RETRY.as_secs()
            );
        }
        let figures = self.figures();
        if let Some(retried) = figures.retried {
            println!(
                "{:<36} {:>13.1}%",
                "assigns decided more than once",
                100.0 * retried
            );
        }
        match &self.statements {
            Some(statements) => statements.print(self.assigned.max(1) as f64),
            None => println!(
                "{:<36} {:>14}",
                "statements per assign", "n/a (no pg_stat_statements)"
            ),
        }
        if self.most_in_flight > 0 {
            println!(
                "{:<36} {:>14}",
                "most assigns in flight", self.most_in_flight
            );
            let late = self
                .lateness
                .iter()
                .filter(|late| **late > Duration::from_millis(1))
                .count();
            println!("{:<36} {:>14}", "sends late by > 1 ms", late);
            let by_second: Vec<String> = self.slow_by_second.iter().map(u64::to_string).collect();
            let from = self
                .schedule_began
                .map(|began| format!(" (from {} UTC)", began.format("%H:%M:%S%.3f")))
                .unwrap_or_default();
            println!(
                "{:<36} {:>14}{from}",
                format!("answers > {} ms, by second", SLOW_ANSWER.as_millis()),
                by_second.join(" ")
            );
            // Counted in the answer times above: a machine that holds up the generator shows here, not in the server.
            println!(
                "{:<36} {:>11.1} ms (p99.9 {:.1} ms)",
                "send lateness p99",
                percentile_ms(&self.lateness, 0.99),
                percentile_ms(&self.lateness, 0.999)
            );
        }
        if let (Some(cpu), Some(per_assign)) = (self.cpu, figures.cpu_per_assign) {
            println!(
                "{:<36} {:>11.2} ms (server {:.0}%, load generator and its hosts {:.0}%, Postgres and the rest {:.0}%)",
                "machine CPU per assign",
                per_assign * 1000.0,
                100.0 * cpu.server / cpu.machine.max(1e-9),
                100.0 * cpu.generator / cpu.machine.max(1e-9),
                100.0 * (cpu.machine - cpu.server - cpu.generator).max(0.0) / cpu.machine.max(1e-9),
            );
            println!(
                "{:<36} {:>14.1} (the kernel {:.0}% of the machine's CPU)",
                "context switches per assign",
                cpu.switches / self.assigned.max(1) as f64,
                100.0 * cpu.kernel / cpu.machine.max(1e-9),
            );
            if let Some(per_insert) = cpu_per_insert {
                println!(
                    "{:<36} {:>13.1}x",
                    "assign / pgbench insert, in CPU",
                    per_assign / per_insert.max(1e-12)
                );
            }
        }
    }
}

/// Counts every phase of assign load shares.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    assigned: AtomicU64,
    refused: AtomicU64,
    shed: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn count(&self, answer: &Answer) {
        let counter = match answer {
            Answer::Assigned(_) => &self.assigned,
            Answer::Refused => &self.refused,
            Answer::Shed => &self.shed,
            Answer::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counts a phase's figures are taken from, as the phase starts.
struct Before {
    /// Assigns decided more than once, and all assigns, as the servers had counted them.
    retries: (f64, f64),
    statements: Option<Statements>,
    cpu: Option<CpuTimes>,
    started: Instant,
}

/// What the assign phases send to, and as whom.
struct AssignLoad<'a> {
    client: &'a reqwest::Client,
    /// The load's database, for `pg_stat_statements`.
    database: &'a Database,
    bases: &'a [String],
    tokens: &'a Tokens,
    users: &'a Users,
    keep: bool,
    seconds: u64,
}

impl AssignLoad<'_> {
    /// Every client assigns, then (unless `keep`) disconnects what it got, then assigns again, for `seconds`.
    async fn closed_loop(&self, clients: usize, server_pids: &[u32]) -> anyhow::Result<Phase> {
        let deadline = Instant::now() + Duration::from_secs(self.seconds);
        let tally = Arc::new(Tally::default());
        let before = self.before(server_pids).await;
        let mut tasks = Vec::new();
        for index in 0..clients {
            let client = self.client.clone();
            let base = self.bases[index % self.bases.len()].clone();
            let token = self.users.token(index).to_string();
            let tokens = self.tokens.clone();
            let tally = tally.clone();
            let keep = self.keep;
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut session = 0i64;
                while Instant::now() < deadline {
                    session += 1;
                    let sent = Instant::now();
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    let answer = assign(&client, &base, &token, session).await;
                    latencies.push((sent.elapsed(), matches!(answer, Answer::Shed)));
                    tally.count(&answer);
                    if let (Answer::Assigned(mandelbox_id), false) = (&answer, keep) {
                        disconnect(&client, &base, &tokens, mandelbox_id).await;
                    }
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await?);
        }
        self.finish(&tally, latencies, before, server_pids, (Vec::new(), 0))
            .await
    }

    /// Assigns sent at `rate` per second for `seconds`, on schedule whatever the answers' speed (no send waits for
    /// an answer), each timed from its scheduled send: a queue anywhere shows in the figures instead of slowing the
    /// sender down.
    async fn open_loop(&self, rate: f64, server_pids: &[u32]) -> anyhow::Result<Phase> {
        let total = (rate * self.seconds as f64).round().max(1.0) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let tally = Arc::new(Tally::default());
        let in_flight = Arc::new(AtomicU64::new(0));
        let mut most_in_flight = 0;
        let before = self.before(server_pids).await;
        // The schedule is kept by a thread of its own, which sleeps to each send time with the operating system's
        // precision (tens of microseconds) and hands the send to the runtime: tokio's timers fire on whole
        // milliseconds, which would make most sends up to a millisecond late and add that to every answer time.
        let first = std::time::Instant::now() + Duration::from_millis(20);
        let schedule_began = chrono::Utc::now() + chrono::Duration::milliseconds(20);
        let (pace, mut due) = tokio::sync::mpsc::unbounded_channel::<(u64, std::time::Instant)>();
        let pacer = std::thread::spawn(move || {
            for index in 0..total {
                let scheduled = first + interval.mul_f64(index as f64);
                if let Some(wait) = scheduled.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(wait);
                }
                if pace.send((index, scheduled)).is_err() {
                    return;
                }
            }
        });
        let mut tasks = Vec::with_capacity(total as usize);
        while let Some((index, scheduled)) = due.recv().await {
            let scheduled = tokio::time::Instant::from_std(scheduled);
            let client = self.client.clone();
            let base = self.bases[index as usize % self.bases.len()].clone();
            let token = self.users.token(index as usize).to_string();
            let tokens = self.tokens.clone();
            let (tally, in_flight) = (tally.clone(), in_flight.clone());
            let keep = self.keep;
            most_in_flight = most_in_flight.max(in_flight.fetch_add(1, Ordering::Relaxed) + 1);
            tally.sent.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                let late = scheduled.elapsed();
                let answer = assign(&client, &base, &token, index as i64 + 1).await;
                let answered = scheduled.elapsed();
                tally.count(&answer);
                if let (Answer::Assigned(mandelbox_id), false) = (&answer, keep) {
                    disconnect(&client, &base, &tokens, mandelbox_id).await;
                }
                in_flight.fetch_sub(1, Ordering::Relaxed);
                ((answered, matches!(answer, Answer::Shed)), late)
            }));
        }
        pacer
            .join()
            .map_err(|_| anyhow::anyhow!("the open loop's pacer thread panicked"))?;
        let mut latencies = Vec::with_capacity(tasks.len());
        let mut lateness = Vec::with_capacity(tasks.len());
        for task in tasks {
            let (answered, late) = task.await?;
            latencies.push(answered);
            lateness.push(late);
        }
        let times: Vec<Duration> = latencies.iter().map(|(took, _)| *took).collect();
        let slow = slow_by_second(&times, rate, SLOW_ANSWER);
        let mut phase = self
            .finish(
                &tally,
                latencies,
                before,
                server_pids,
                (lateness, most_in_flight),
            )
            .await?;
        phase.slow_by_second = slow;
        phase.schedule_began = Some(schedule_began);
        Ok(phase)
    }

    /// What the servers and the machine had counted as a phase starts.
    async fn before(&self, server_pids: &[u32]) -> Before {
        let retries = self.retries().await;
        let statements = Statements::read(self.database).await;
        Before {
            retries,
            statements,
            cpu: CpuTimes::read(server_pids),
            started: Instant::now(),
        }
    }

    /// The phase's figures: what was counted since `before`.
    async fn finish(
        &self,
        tally: &Tally,
        answers: Vec<(Duration, bool)>,
        before: Before,
        server_pids: &[u32],
        (mut lateness, most_in_flight): (Vec<Duration>, u64),
    ) -> anyhow::Result<Phase> {
        let elapsed = before.started.elapsed().as_secs_f64();
        let cpu = CpuTimes::read(server_pids)
            .zip(before.cpu)
            .map(|(after, earlier)| after.since(&earlier));
        let statements = Statements::read(self.database)
            .await
            .zip(before.statements)
            .map(|(after, earlier)| after.since(&earlier));
        let (retried, counted) = self.retries().await;
        let (retried_before, counted_before) = before.retries;
        let (latencies, with_retries) = answer_times(&answers);
        lateness.sort();
        Ok(Phase {
            sent: tally.sent.load(Ordering::Relaxed),
            assigned: tally.assigned.load(Ordering::Relaxed),
            refused: tally.refused.load(Ordering::Relaxed),
            shed: tally.shed.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            latencies,
            with_retries,
            elapsed,
            cpu,
            retried: retried - retried_before,
            counted: counted - counted_before,
            lateness,
            most_in_flight,
            slow_by_second: Vec::new(),
            schedule_began: None,
            statements,
        })
    }

    /// Assigns decided more than once, and all assigns, as the servers have counted them so far.
    async fn retries(&self) -> (f64, f64) {
        let mut texts = Vec::new();
        for base in self.bases {
            if let Ok(response) = self.client.get(format!("{base}/metrics")).send().await {
                texts.push(response.text().await.unwrap_or_default());
            }
        }
        (
            metric_total(&texts, "whist_assigns_retried_total").unwrap_or(0.0),
            metric_sum(&texts, "whist_assigns_total"),
        )
    }
}

/// Calls of each statement the load's database ran, from `pg_stat_statements` (the server processes' and the load
/// test's own few: the latter are a handful per phase).
struct Statements {
    calls: std::collections::HashMap<String, i64>,
}

impl Statements {
    /// Creates the extension in the load's database. Postgres keeps statement statistics only when it loaded
    /// `pg_stat_statements` at start (`shared_preload_libraries`); otherwise [`Statements::read`] finds none.
    async fn enable(database: &Database) {
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(database.any())
            .await;
    }

    /// The calls so far, by statement text; `None` when Postgres keeps none.
    async fn read(database: &Database) -> Option<Self> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT query, calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(database.any())
        .await
        .ok()?;
        let mut calls = std::collections::HashMap::with_capacity(rows.len());
        for (query, count) in rows {
            *calls.entry(query).or_insert(0) += count;
        }
        Some(Self { calls })
    }

    fn since(mut self, earlier: &Self) -> Self {
        for (query, count) in &mut self.calls {
            *count -= earlier.calls.get(query).copied().unwrap_or(0);
        }
        self.calls.retain(|_, count| *count > 0);
        self
    }

    /// Statements per assign, and the most frequent ones.
    fn print(&self, assigns: f64) {
        let total: i64 = self.calls.values().sum();
        println!(
            "{:<36} {:>14.1}",
            "statements per assign",
            total as f64 / assigns
        );
        let mut top: Vec<(&String, &i64)> = self.calls.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (query, count) in top.into_iter().take(8) {
            let text: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
            let text: String = text.chars().take(72).collect();
            println!("  {:>6.2} per assign  {text}", *count as f64 / assigns);
        }
    }
}

/// One assign for the user signed in with `token`.
async fn assign(client: &reqwest::Client, base: &str, token: &str, session: i64) -> Answer {
    let response = client
        .post(format!("{base}/mandelbox/assign"))
        .bearer_auth(token)
        .json(&serde_json::json!({
            "regions": ["us-east-1"],
            "client_commit_hash": "load",
            "session_id": session,
            "user_email": "load@example.com",
        }))
        .send()
        .await;
    let Ok(response) = response else {
        return Answer::Failed;
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    match (status, body["mandelbox_id"].as_str()) {
        (200, Some(mandelbox_id)) => Answer::Assigned(mandelbox_id.to_string()),
        (503, _) if body["error"] == "NO_INSTANCE_AVAILABLE" => Answer::Refused,
        (429, _) => Answer::Shed,
        _ => Answer::Failed,
    }
}

/// The protocol server's disconnect of `mandelbox_id`.
async fn disconnect(client: &reqwest::Client, base: &str, tokens: &Tokens, mandelbox_id: &str) {
    let secret = tokens.derive(Purpose::Protocol, mandelbox_id);
    let _ = client
        .post(format!("{base}/mandelbox/{mandelbox_id}/disconnect"))
        .bearer_auth(secret)
        .send()
        .await;
}

/// Every series of `name` (any labels) summed over several servers' metrics.
fn metric_sum(texts: &[String], name: &str) -> f64 {
    texts
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| {
            let (metric, value) = line.rsplit_once(' ')?;
            let metric_name = metric.split('{').next()?;
            (metric_name == name)
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Heartbeats over one kept-alive HTTP/1.1 connection, one request at a time, as a host sends them; the hosts of
/// `hosts` take turns. Built on hyper's connection API rather than reqwest: the load generator shares the machine
/// with the server, and reqwest's pool and per-request building cost about as much CPU as the server's handling.
async fn send_heartbeats(
    address: std::net::SocketAddr,
    hosts: &[(String, String)],
    deadline: Instant,
    heartbeats: &AtomicU64,
) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let host_header = address.to_string();
    let mut number = 0i64;
    while Instant::now() < deadline {
        for (instance_id, authorization) in hosts {
            number += 1;
            let body = serde_json::to_vec(&whist_adapters::simulated_host::heartbeat_body(
                instance_id,
                number,
            ))?;
            let request = hyper::Request::post("/host/heartbeat")
                .header(hyper::header::HOST, &host_header)
                .header(hyper::header::AUTHORIZATION, authorization)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            http_body_util::BodyExt::collect(response.into_body()).await?;
            anyhow::ensure!(status.is_success(), "a heartbeat was answered {status}");
            heartbeats.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    Ok(())
}

/// The log's head: how many events have been given a position.
async fn log_head(database: &Database) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT position FROM event_log_head WHERE id = 1")
            .fetch_one(database.any())
            .await?,
    )
}

/// How slow an open loop's answer may be (the half-rate p99 target) before it counts in the phase's slow answers.
const SLOW_ANSWER: Duration = Duration::from_millis(20);

/// Of an open loop's answer times, in the order of their scheduled sends at `rate` per second, how many in each
/// second of the schedule took longer than `slow`.
fn slow_by_second(answers: &[Duration], rate: f64, slow: Duration) -> Vec<u64> {
    let per_second = rate.max(1e-9);
    let seconds = (answers.len() as f64 / per_second).ceil() as usize;
    let mut counts = vec![0; seconds];
    for (index, took) in answers.iter().enumerate() {
        let second = ((index as f64 / per_second) as usize).min(seconds.saturating_sub(1));
        if *took > slow {
            if let Some(count) = counts.get_mut(second) {
                *count += 1;
            }
        }
    }
    counts
}

/// Each answer's time, sorted, and, when some were 429s, the same with each 429 a second later (when the desktop
/// app retries it: what it cost its user is at least that), sorted; empty without 429s.
fn answer_times(answers: &[(Duration, bool)]) -> (Vec<Duration>, Vec<Duration>) {
    let mut latencies: Vec<Duration> = answers.iter().map(|(took, _)| *took).collect();
    latencies.sort();
    let mut with_retries: Vec<Duration> = if answers.iter().any(|(_, shed)| *shed) {
        answers
            .iter()
            .map(|(took, shed)| if *shed { *took + SHED_RETRY } else { *took })
            .collect()
    } else {
        Vec::new()
    };
    with_retries.sort();
    (latencies, with_retries)
}

/// Busy CPU time, in seconds, of the whole machine, of the server and of this process (the load generator and its
/// simulated hosts), read from `/proc` (Linux); `None` where that cannot be read.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    machine: f64,
    server: f64,
    generator: f64,
    /// The machine's busy time in the kernel (system, interrupts, soft interrupts), of `machine`.
    kernel: f64,
    /// Context switches on the whole machine: what more processes and threads than cores cost shows here.
    switches: f64,
}

impl CpuTimes {
    fn read(server_pids: &[u32]) -> Option<Self> {
        let ticks = clock_ticks();
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
        let busy: u64 = fields
            .iter()
            .take(8)
            .enumerate()
            .filter(|(index, _)| *index != 3 && *index != 4)
            .map(|(_, value)| value)
            .sum();
        // system, irq, softirq.
        let kernel: u64 = [2, 5, 6]
            .iter()
            .filter_map(|&index| fields.get(index))
            .sum();
        let switches = stat
            .lines()
            .find_map(|line| line.strip_prefix("ctxt "))
            .and_then(|count| count.trim().parse::<f64>().ok())?;
        Some(Self {
            machine: busy as f64 / ticks,
            kernel: kernel as f64 / ticks,
            switches,
            server: server_pids
                .iter()
                .map(|pid| process_ticks(*pid))
                .sum::<Option<f64>>()?
                / ticks,
            generator: process_ticks(std::process::id())? / ticks,
        })
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            machine: self.machine - earlier.machine,
            server: self.server - earlier.server,
            generator: self.generator - earlier.generator,
            kernel: self.kernel - earlier.kernel,
            switches: self.switches - earlier.switches,
        }
    }
}

/// User plus system time of one process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn process_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after its closing one.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((user + system) as f64)
}

/// Clock ticks per second of `/proc`'s times (`getconf CLK_TCK`; 100 on Linux when that cannot run).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

/// Each series of the counter `metric` in the servers' `/metrics` answers, divided by the assigns answered.
fn print_per_assign(server_metrics: &[String], metric: &str, caption: &str, assigned: f64) {
    let prefix = format!("{metric}{{");
    for line in server_metrics
        .iter()
        .flat_map(|text| text.lines())
        .filter(|line| line.starts_with(&prefix))
    {
        if let Some((series, value)) = line.rsplit_once(' ') {
            let count: f64 = value.trim().parse().unwrap_or(0.0);
            let labels = series.trim_start_matches(metric).replace('"', "");
            println!(
                "{:<36} {:>14.2}",
                format!("{caption} {labels}"),
                count / assigned
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        answer_times, compare_runs, metric_total, metric_value, parse_setting, percentile_ms,
        server_settings, slow_by_second, ClosedFigures, CpuTimes, LoadTestOptions, RunSummary,
    };
    use std::time::Duration;

    fn run(servers: usize, rate: f64, cpu_ms: f64, p99_ms: f64, retried: f64) -> RunSummary {
        RunSummary {
            servers,
            closed: Some(ClosedFigures {
                rate,
                cpu_per_assign: Some(cpu_ms / 1000.0),
                // The generator's work per assign does not change with the servers.
                generator_cpu_per_assign: Some(0.000_1),
                p99_ms,
                retried: Some(retried),
            }),
        }
    }

    #[test]
    fn each_run_of_two_servers_is_held_against_the_run_of_one_before_it() {
        let lines = compare_runs(&[
            run(1, 1000.0, 1.0, 40.0, 0.0),
            run(2, 950.0, 1.1, 50.0, 0.01),
            run(1, 2000.0, 0.8, 40.0, 0.0),
            run(2, 1700.0, 1.1, 50.0, 0.0),
        ]);
        let text = lines.join("\n");
        assert_eq!(
            lines
                .iter()
                .filter(|line| line.starts_with("-- 2 servers against 1"))
                .count(),
            2,
            "{text}"
        );
        // The first pair holds every condition; the second misses on rate (85%) and CPU (1.38x). The first run of
        // two is also held against the mean of the runs around it (1,500/s, 0.9 ms): 63%, 1.22x.
        let every: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("every condition at once"))
            .map(|line| line.trim_end().rsplit(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(every, ["yes", "no", "no"], "{text}");
        assert!(
            text.contains("63% (950/s against 1500/s; target >= 90%: misses)"),
            "{text}"
        );
        assert!(
            text.contains("85% (1700/s against 2000/s; target >= 90%: misses)"),
            "{text}"
        );
        assert!(text.contains("1.38x (target <= 1.2x: misses)"), "{text}");
    }

    #[test]
    fn a_run_between_two_runs_of_one_is_also_held_against_their_mean() {
        // The machine slowed steadily: one serve went 2,000 -> 1,600/s, 0.8 -> 1.0 ms.
        let lines = compare_runs(&[
            run(1, 2000.0, 0.8, 40.0, 0.0),
            run(2, 1700.0, 1.0, 50.0, 0.01),
            run(1, 1600.0, 1.0, 40.0, 0.0),
        ]);
        let text = lines.join("\n");
        let headings: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("--"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            headings,
            [
                "-- 2 servers against 1 (closed loop, back to back) --",
                "-- 2 servers against the mean of the runs of 1 before and after it --"
            ],
            "{text}"
        );
        // Against the run before it: 85%, 1.25x; against the mean (1,800/s, 0.9 ms): 94%, 1.11x.
        assert!(
            text.contains("85% (1700/s against 2000/s; target >= 90%: misses)"),
            "{text}"
        );
        assert!(text.contains("1.25x (target <= 1.2x: misses)"), "{text}");
        assert!(
            text.contains("94% (1700/s against 1800/s; target >= 90%: holds)"),
            "{text}"
        );
        assert!(text.contains("1.11x (target <= 1.2x: holds)"), "{text}");
        assert!(text.ends_with("yes"), "{text}");
    }

    #[test]
    fn a_series_is_summed_up_by_the_median_of_each_ratio_against_the_runs_around_it() {
        // 1,2,1,2,1,2,1: the machine swings; the runs of two sit at 1,500, 1,400 and 1,700/s.
        let lines = compare_runs(&[
            run(1, 1600.0, 1.0, 40.0, 0.0),
            run(2, 1500.0, 1.1, 50.0, 0.01),
            run(1, 1400.0, 1.0, 40.0, 0.0),
            run(2, 1400.0, 1.5, 50.0, 0.002),
            run(1, 1800.0, 1.0, 40.0, 0.0),
            run(2, 1700.0, 1.15, 70.0, 0.0),
            run(1, 1800.0, 1.0, 40.0, 0.0),
        ]);
        let text = lines.join("\n");
        let summary: Vec<&str> = lines
            .iter()
            .skip_while(|line| !line.starts_with("-- the series: 3 runs of 2 servers"))
            .map(String::as_str)
            .collect();
        // Against the means around them (1,500, 1,600, 1,800/s): 100%, 88%, 94%; CPU 1.1x, 1.5x, 1.15x; p99
        // 1.25x, 1.25x, 1.75x; retried 1%, 0.2%, 0%.
        assert_eq!(summary.len(), 7, "{text}");
        assert!(
            summary[1].ends_with("94% (88-100%; target >= 90%: holds)"),
            "{text}"
        );
        assert!(
            summary[2].ends_with("1.15x (1.10-1.50x; target <= 1.2x: holds)"),
            "{text}"
        );
        assert!(
            summary[3].ends_with("1.00x (1.00-1.00x; control, no target)"),
            "{text}"
        );
        assert!(
            summary[4].ends_with("1.25x (1.25-1.75x; target <= 1.5x: holds)"),
            "{text}"
        );
        assert!(
            summary[5].ends_with("0.2% (0.0-1.0%; target <= 5%: holds)"),
            "{text}"
        );
        // Each run alone misses one condition or more but the first; the medians hold every one.
        assert!(summary[6].ends_with("yes (in 1 of 3 runs alone)"), "{text}");
    }

    #[test]
    fn a_series_of_several_counts_is_summed_up_count_by_count() {
        let lines = compare_runs(&[
            run(1, 1000.0, 1.0, 40.0, 0.0),
            run(2, 950.0, 1.1, 50.0, 0.0),
            run(4, 700.0, 1.6, 80.0, 0.0),
            run(1, 1000.0, 1.0, 40.0, 0.0),
            run(2, 930.0, 1.1, 50.0, 0.0),
            run(4, 720.0, 1.6, 80.0, 0.0),
            run(1, 1000.0, 1.0, 40.0, 0.0),
        ]);
        let text = lines.join("\n");
        let summaries: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("-- the series"))
            .map(|line| line.split(',').next().unwrap_or_default())
            .collect();
        assert_eq!(
            summaries,
            [
                "-- the series: 2 runs of 2 servers",
                "-- the series: 2 runs of 4 servers"
            ],
            "{text}"
        );
        assert!(
            text.contains("94% (93-95%; target >= 90%: holds)"),
            "{text}"
        );
        assert!(
            text.contains("71% (70-72%; target >= 90%: misses)"),
            "{text}"
        );
    }

    #[test]
    fn a_single_count_or_a_run_without_a_closed_loop_compares_nothing_it_cannot() {
        assert!(compare_runs(&[run(2, 1.0, 1.0, 1.0, 0.0)]).is_empty());
        let open_only = RunSummary {
            servers: 2,
            closed: None,
        };
        let lines = compare_runs(&[run(1, 1.0, 1.0, 1.0, 0.0), open_only]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].starts_with("n/a"), "{lines:?}");
    }

    #[test]
    fn a_server_setting_is_a_key_and_everything_after_its_first_equals_sign() {
        assert_eq!(
            parse_setting("TOKIO_WORKER_THREADS=1"),
            Ok(("TOKIO_WORKER_THREADS".to_string(), "1".to_string()))
        );
        assert_eq!(
            parse_setting("RUST_LOG=whist=debug"),
            Ok(("RUST_LOG".to_string(), "whist=debug".to_string()))
        );
        assert_eq!(
            parse_setting("EMPTY="),
            Ok(("EMPTY".to_string(), String::new()))
        );
        assert!(parse_setting("=1").is_err());
        assert!(parse_setting("NO_VALUE").is_err());
    }

    fn options(args: &[&str]) -> LoadTestOptions {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            options: LoadTestOptions,
        }
        let args = std::iter::once("loadtest").chain(args.iter().copied());
        <Command as clap::Parser>::parse_from(args).options
    }

    fn threads(settings: &[(String, String)]) -> Vec<&str> {
        settings
            .iter()
            .filter(|(key, _)| key == "TOKIO_WORKER_THREADS")
            .map(|(_, value)| value.as_str())
            .collect()
    }

    #[test]
    fn servers_that_share_the_cores_divide_them_and_each_keeps_one_at_least() {
        let shared = options(&["--share-cores", "--server-env", "WHIST_ASSIGN_QUEUE_MS=0"]);
        assert_eq!(threads(&server_settings(&shared, 1, 2)), ["2"]);
        assert_eq!(threads(&server_settings(&shared, 2, 2)), ["1"]);
        assert_eq!(threads(&server_settings(&shared, 4, 2)), ["1"]);
        assert_eq!(threads(&server_settings(&shared, 2, 8)), ["4"]);
        assert!(server_settings(&shared, 2, 2)
            .contains(&("WHIST_ASSIGN_QUEUE_MS".to_string(), "0".to_string())));

        let told = options(&["--share-cores", "--server-env", "TOKIO_WORKER_THREADS=3"]);
        assert_eq!(threads(&server_settings(&told, 2, 2)), ["3"]);

        let unshared = options(&[]);
        assert!(threads(&server_settings(&unshared, 2, 2)).is_empty());
    }

    #[test]
    fn slow_answers_are_counted_in_the_second_of_their_scheduled_send() {
        let ms = Duration::from_millis;
        // Four sends a second over two and a half seconds: a stall in the second second.
        let answers = [
            ms(3),
            ms(4),
            ms(25),
            ms(2),
            ms(40),
            ms(31),
            ms(20),
            ms(5),
            ms(3),
            ms(90),
        ];
        assert_eq!(slow_by_second(&answers, 4.0, ms(20)), [1, 2, 1]);
        assert_eq!(slow_by_second(&[], 4.0, ms(20)), Vec::<u64>::new());
    }

    #[test]
    fn a_429_counts_as_its_retry_a_second_later_in_the_second_view_only() {
        let ms = Duration::from_millis;
        let (latencies, with_retries) =
            answer_times(&[(ms(5), false), (ms(2), true), (ms(3), false)]);
        assert_eq!(latencies, [ms(2), ms(3), ms(5)]);
        assert_eq!(with_retries, [ms(3), ms(5), ms(1002)]);
        let (_, none) = answer_times(&[(ms(5), false)]);
        assert!(none.is_empty(), "no 429, no second view");
    }

    #[test]
    fn a_percentile_is_the_duration_at_its_rank_and_zero_of_none() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&sorted, 0.5), 51.0);
        assert_eq!(percentile_ms(&sorted, 0.99), 100.0);
        assert_eq!(percentile_ms(&sorted, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }

    #[test]
    fn a_metric_is_read_by_its_exact_name_from_the_prometheus_text() {
        let text = "# TYPE whist_append_batch_units summary\n\
                    whist_append_batch_units{quantile=\"0.5\"} 3\n\
                    whist_append_batch_units_sum 5120\n\
                    whist_append_batch_units_count 640\n";
        assert_eq!(
            metric_value(text, "whist_append_batch_units_sum"),
            Some(5120.0)
        );
        assert_eq!(
            metric_value(text, "whist_append_batch_units_count"),
            Some(640.0)
        );
        assert_eq!(metric_value(text, "whist_append_batch_units"), None);
    }

    #[test]
    fn the_machine_s_cpu_counts_its_kernel_time_and_context_switches() {
        let before = CpuTimes::read(&[std::process::id()]).expect("/proc is readable on Linux");
        // Make the kernel switch: sleep a few times.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let after = CpuTimes::read(&[std::process::id()]).expect("/proc is readable on Linux");
        let spent = after.since(&before);
        assert!(spent.switches >= 5.0, "{spent:?}");
        assert!(
            before.kernel > 0.0 && before.kernel <= before.machine,
            "{before:?}"
        );
        assert!(
            spent.kernel >= 0.0 && spent.kernel <= spent.machine,
            "{spent:?}"
        );
    }

    #[test]
    fn a_metric_is_summed_over_the_servers_that_have_it() {
        let texts = [
            "whist_append_batch_units_sum 10\n".to_string(),
            "whist_append_batch_units_sum 32\n".to_string(),
            "other 1\n".to_string(),
        ];
        assert_eq!(
            metric_total(&texts, "whist_append_batch_units_sum"),
            Some(42.0)
        );
        assert_eq!(metric_total(&texts, "missing"), None);
    }
}
