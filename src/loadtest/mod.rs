//! `whist loadtest`: a live `whist serve` (or several, `--servers`) on a fresh Postgres database with simulated
//! hosts, loaded by 64 desktop clients (assign, then disconnect) and by heartbeating hosts; prints assigns/s with
//! p50/p99 latency and heartbeats/s next to pgbench's one-row insert at the same concurrency on the same server.
//!
//! This file starts the servers, the fleet and the load, and prints the report. The assign phases (closed and open
//! loop) are in `phases`, what they are measured with (CPU from `/proc`, `pg_stat_statements`, the servers'
//! counters) in `measures`, and the comparison of the runs of a series (`--servers 1,2,1`) in `series`.

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

mod measures;
mod phases;
mod series;

use measures::{
    metric_total, print_per_assign, CpuTimes, LoadProcesses, OtherProcesses, Statements,
};
use phases::{AssignLoad, Phase};
use series::{compare_runs, RunSummary};

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
    // The load's processes: the machine's others' CPU is told apart from theirs.
    let load_processes = LoadProcesses::find(&server_pids, &database).await;
    // Statements per assign, where Postgres keeps statement statistics.
    Statements::enable(&database).await;
    let load = AssignLoad {
        client: &client,
        database: &database,
        url,
        bases: &bases,
        tokens: &tokens,
        users: &users,
        load_processes: &load_processes,
        keep: options.keep_mandelboxes,
        seconds: options.seconds,
    };
    let head_before = log_head(&database).await?;
    let mut closed = match options.rate {
        Some(Rate::Fixed(_)) => None,
        _ => Some(load.closed_loop(options.clients, &server_pids).await?),
    };
    let open_rate = match options.rate {
        None => None,
        Some(Rate::Fixed(rate)) => Some(rate),
        Some(Rate::HalfOfClosed) => closed.as_ref().map(|phase| phase.rate() / 2.0),
    };
    let mut open = match open_rate {
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
    let texts = Statements::texts(&database).await;
    for phase in closed.iter_mut().chain(open.iter_mut()) {
        phase.name_statements(&texts);
    }
    database.close().await;

    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    pool.execute("CREATE TABLE IF NOT EXISTS pgbench_one_row (id bigserial PRIMARY KEY, payload text NOT NULL)")
        .await?;
    pool.close().await;
    let machine_before = CpuTimes::read(&[std::process::id()]);
    let others_before = OtherProcesses::read(&load_processes);
    let pgbench_started = Instant::now();
    let pgbench =
        crate::bench::pgbench_one_row_insert(url, options.clients, options.seconds.min(10))?;
    let pgbench_elapsed = pgbench_started.elapsed().as_secs_f64();
    let pgbench_cpu = CpuTimes::read(&[std::process::id()])
        .zip(machine_before)
        .map(|(after, before)| after.since(&before).machine);
    let others_in_pgbench = OtherProcesses::read(&load_processes).since(&others_before);
    let cpu_per_insert = pgbench_cpu.map(|machine| machine / (pgbench * pgbench_elapsed).max(1.0));
    // Postgres alone at the open loop's rate, each transaction writing about what an assign wrote: the machine's own
    // answer times for those writes, measured in the same run, to read the open loop's against.
    let control = match (open.as_ref().and_then(Phase::wal_per_assign), open_rate) {
        (Some(wal), Some(rate)) => Some(
            crate::bench::pgbench_at_rate(url, rate, options.seconds, options.clients, wal).await?,
        ),
        _ => None,
    };
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
        if let (Some(control), Some(wal)) = (&control, phase.wal_per_assign()) {
            phases::print_rate_control(control, rate, phase.percentile(0.99), wal);
        }
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
    if let (Some(per_insert), Some(machine)) = (cpu_per_insert, pgbench_cpu) {
        println!(
            "{:<36} {:>11.3} ms (other processes {:.1}%)",
            "machine CPU per pgbench insert",
            per_insert * 1000.0,
            100.0 * others_in_pgbench / machine.max(1e-9)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
