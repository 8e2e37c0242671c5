//! `whist bench store`: how fast the event store appends, how fast a projection rebuilds, and how fast the log is
//! sealed, exported and verified, printed beside pgbench's one-row insert on the same Postgres in the same run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::Executor;
use whist_adapters::store::{
    AggregateStore, Backend, CommandError, Database, PoolSettings, SessionLimits,
};
use whist_domain::probe::{Probe, ProbeCommand};
use whist_domain::{Actor, EventMetadata};
use whist_projections::ProjectionRunner;

/// The Postgres server a benchmark or the load test makes a database of its own on (and drops afterwards).
#[derive(Debug, clap::Args)]
pub struct BenchServer {
    /// A Postgres server's URL (`postgres://USER[:PASSWORD]@HOST:PORT/DATABASE`); the command creates (and afterwards
    /// drops) a database of its own there.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
}

/// Options of `whist bench store`.
#[derive(Debug, clap::Args)]
pub struct StoreBenchOptions {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// Seconds each append measurement (and each pgbench run) lasts.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Numbers of concurrent writers to measure, comma-separated (`1,4,64`).
    #[arg(long, default_value = "1,4,64", value_delimiter = ',')]
    writers: Vec<usize>,
    /// Events in the log before the timed projection rebuild.
    #[arg(long, default_value_t = 1_000_000)]
    rebuild_events: i64,
    /// One-writer appends made while a REPEATABLE READ transaction stays open (0 skips the measurement): the
    /// latency of the last of them against the first shows whether an open snapshot slows every append.
    #[arg(long, default_value_t = 100_000)]
    snapshot_appends: u64,
    /// Events of the host aggregate whose cold load is timed, from its whole history and from its snapshot (0
    /// skips the measurement).
    #[arg(long, default_value_t = 1_000_000)]
    host_events: i64,
    /// Numbers of `whist` processes appending at once, comma-separated (`1,2,4`; `0` skips the measurement): each
    /// batches its own appends, as every `serve` and `worker` does, and all of them serialise on the log's one
    /// append lock.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    processes: Vec<usize>,
    /// Concurrent writers in each of those processes.
    #[arg(long, default_value_t = 16)]
    process_writers: usize,
    /// Keep the benchmark database afterwards.
    #[arg(long)]
    keep: bool,
}

/// Options of the hidden `whist bench append-worker`: one process of `whist bench store --processes`.
#[derive(Debug, clap::Args)]
pub struct AppendWorkerOptions {
    /// The benchmark database's URL (`postgres://…`), already migrated.
    #[arg(long)]
    database_url: String,
    /// Concurrent writers in this process.
    #[arg(long)]
    writers: usize,
    /// Seconds of appends.
    #[arg(long)]
    seconds: u64,
    /// When to start, in milliseconds since the Unix epoch, so that every worker appends over the same window.
    #[arg(long)]
    start_at_ms: i64,
}

/// One process of `whist bench store --processes`: waits for the common start, appends for `seconds` with
/// `writers` writers, and prints the appends it recorded per second (one number on standard output).
pub async fn append_worker(options: AppendWorkerOptions) -> anyhow::Result<()> {
    let database = Database::connect(
        Some(&options.database_url),
        std::path::Path::new("."),
        PoolSettings::sized(u32::try_from(options.writers + 2).unwrap_or(u32::MAX)),
    )
    .await?;
    // Already migrated by `bench store`; a no-op then, and the same schema if run by hand.
    database.migrate().await?;
    let store = Arc::new(AggregateStore::<Probe>::new(&database, ()));
    let wait = options.start_at_ms - chrono::Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    }
    let appends = measure_appends(
        &store,
        options.writers,
        Duration::from_secs(options.seconds),
    )
    .await?;
    database.close().await;
    println!("{appends}");
    Ok(())
}

/// Appends/s of `processes` `whist bench append-worker` processes of `writers` writers each, started together.
fn measure_appends_across_processes(
    url: &str,
    processes: usize,
    writers: usize,
    seconds: u64,
) -> anyhow::Result<f64> {
    // Time for every process to start and connect before the common start.
    let start_at_ms = chrono::Utc::now().timestamp_millis() + 1_500;
    let executable = std::env::current_exe()?;
    let children = (0..processes)
        .map(|_| {
            std::process::Command::new(&executable)
                .args(["bench", "append-worker", "--database-url", url])
                .args(["--writers", &writers.to_string()])
                .args(["--seconds", &seconds.to_string()])
                .args(["--start-at-ms", &start_at_ms.to_string()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .context("Failed to start a `whist bench append-worker`")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut total = 0.0;
    for child in children {
        let output = child.wait_with_output()?;
        anyhow::ensure!(
            output.status.success(),
            "an append worker failed ({})",
            output.status
        );
        let text = String::from_utf8_lossy(&output.stdout);
        total += text
            .trim()
            .parse::<f64>()
            .with_context(|| format!("an append worker printed {text:?}, not a rate"))?;
    }
    Ok(total)
}

/// Appends at each end of the open-snapshot measurement whose mean latency is compared.
const SNAPSHOT_WINDOW: u64 = 2_000;

/// Aggregates each writer cycles over, so that every command loads a short history like a real one.
const AGGREGATES_PER_WRITER: usize = 50;

pub async fn store(options: StoreBenchOptions) -> anyhow::Result<()> {
    let scratch = ScratchDatabase::create(&options.server.database_url, "whist_bench").await?;
    let outcome = run_store_bench(&options, &scratch.url).await;
    if !options.keep {
        scratch.drop_it().await?;
    }
    outcome
}

/// A database of a benchmark's own on the server named by `--database-url`, created empty (dropped first if a
/// previous run of the same process id left it).
pub struct ScratchDatabase {
    admin: sqlx::PgPool,
    name: String,
    /// The server's URL naming this database.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `{prefix}_{process id}` on the server at `server_url`.
    ///
    /// # Errors
    /// The server cannot be reached, or the database not created.
    pub async fn create(server_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}_{}", std::process::id());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(server_url)
            .await
            .context("Failed to connect to the Postgres server named by --database-url")?;
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await?;
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        let url = replace_database(server_url, &name);
        Ok(Self { admin, name, url })
    }

    /// A pool of one connection to the database.
    ///
    /// # Errors
    /// The database cannot be reached.
    pub async fn connect(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await?)
    }

    /// Drops the database, whoever is still connected to it.
    ///
    /// # Errors
    /// The server refused.
    pub async fn drop_it(self) -> anyhow::Result<()> {
        self.admin
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await?;
        Ok(())
    }
}

async fn run_store_bench(options: &StoreBenchOptions, bench_url: &str) -> anyhow::Result<()> {
    println!("whist bench store: Postgres database {}", redact(bench_url));
    println!(
        "{:<38} {:>12} {:>14} {:>8}",
        "measure", "whist", "pgbench", "ratio"
    );
    for &writers in &options.writers {
        // A fresh pool per measurement, closed before pgbench runs, so that both fit in max_connections.
        let database = Database::connect(
            Some(bench_url),
            std::path::Path::new("."),
            PoolSettings::sized(u32::try_from(writers + 2).unwrap_or(u32::MAX)),
        )
        .await?;
        database.migrate().await?;
        let Backend::Postgres(pool) = database.backend().clone() else {
            anyhow::bail!("the store benchmark needs Postgres");
        };
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS pgbench_one_row (id bigserial PRIMARY KEY, payload text NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let store = Arc::new(AggregateStore::<Probe>::new(&database, ()));
        let appends =
            measure_appends(&store, writers, Duration::from_secs(options.seconds)).await?;
        database.close().await;
        let pgbench = pgbench_one_row_insert(bench_url, writers, options.seconds)?;
        println!(
            "{:<38} {:>10.0}/s {:>12.0}/s {:>7.0}%",
            format!("appends, {writers} writer(s)"),
            appends,
            pgbench,
            100.0 * appends / pgbench.max(1e-9)
        );
    }

    for &processes in options.processes.iter().filter(|&&processes| processes > 0) {
        let appends = measure_appends_across_processes(
            bench_url,
            processes,
            options.process_writers,
            options.seconds,
        )?;
        let clients = processes * options.process_writers;
        let pgbench = pgbench_one_row_insert(bench_url, clients, options.seconds)?;
        println!(
            "{:<38} {:>10.0}/s {:>12.0}/s {:>7.0}%",
            format!(
                "appends, {processes} process(es) x {} writers",
                options.process_writers
            ),
            appends,
            pgbench,
            100.0 * appends / pgbench.max(1e-9)
        );
    }

    let database = Database::connect(
        Some(bench_url),
        std::path::Path::new("."),
        PoolSettings {
            max_connections: 4,
            limits: SessionLimits::none(),
        },
    )
    .await?;
    let Backend::Postgres(pool) = database.backend().clone() else {
        anyhow::bail!("the store benchmark needs Postgres");
    };
    if options.snapshot_appends >= 2 * SNAPSHOT_WINDOW {
        let (first, last) =
            measure_appends_under_an_open_snapshot(&database, &pool, options.snapshot_appends)
                .await?;
        println!(
            "{:<38} {:>8.3} ms {:>11.3} ms {:>7.2}x",
            format!(
                "append under a snapshot, first/last {SNAPSHOT_WINDOW} of {}",
                options.snapshot_appends
            ),
            first.as_secs_f64() * 1e3,
            last.as_secs_f64() * 1e3,
            last.as_secs_f64() / first.as_secs_f64().max(1e-9)
        );
    }
    if options.host_events > 1 {
        let (whole, from_snapshot) =
            measure_cold_host_loads(&database, &pool, options.host_events).await?;
        println!(
            "{:<38} {:>8.1} ms {:>11} {:>8}",
            format!("cold load, host of {} events, whole", options.host_events),
            whole.as_secs_f64() * 1e3,
            "-",
            "-"
        );
        println!(
            "{:<38} {:>8.1} ms {:>11} {:>8}",
            "cold load, same host, from snapshot",
            from_snapshot.as_secs_f64() * 1e3,
            "-",
            "-"
        );
    }
    let loaded = load_synthetic_log(&pool, options.rebuild_events).await?;
    let runner = ProjectionRunner::new(database.clone(), whist_projections::all());
    runner.register().await?;
    let report = runner.rebuild("aggregate_index", &|_| {}).await?;
    println!(
        "{:<38} {:>10.0}/s {:>14} {:>8}",
        format!("rebuild aggregate_index, {} events", report.events),
        report.events_per_second(),
        "-",
        "-"
    );
    // Audit over the same log: seal it (the event_chain projection), export it as JSON Lines, verify the chain.
    let sealing = Instant::now();
    runner.catch_up("event_chain").await?;
    let sealed = sealing.elapsed();
    let row = |what: String, events: u64, elapsed: Duration| {
        println!(
            "{:<38} {:>10.0}/s {:>14} {:>8}",
            what,
            events as f64 / elapsed.as_secs_f64().max(1e-9),
            "-",
            "-"
        );
    };
    let total = u64::try_from(loaded).unwrap_or(0);
    row(format!("seal event_chain, {total} events"), total, sealed);
    let export =
        whist_api::control::audit::export(&database, 0, &mut std::io::sink(), &|_, _| {}).await?;
    row(
        format!("export JSON Lines, {} events", export.events),
        export.events,
        export.elapsed,
    );
    let verifying = Instant::now();
    let verified = whist_adapters::store::chain::verify(&database, &|_| {}).await?;
    if let Some(broken) = &verified.broken {
        anyhow::bail!("the chain of the synthetic log is broken at the {broken}");
    }
    row(
        format!("verify chain, {} events", verified.verified),
        verified.verified,
        verifying.elapsed(),
    );
    println!(
        "(log loaded with {loaded} events; rebuild took {:.2} s; targets: appends >= 50% of pgbench, an append under an open snapshot at the end within 2x of the start, a cold load from a snapshot <= 20 ms, rebuild, export and verify >= 100000/s)",
        report.elapsed.as_secs_f64()
    );
    database.close().await;
    Ok(())
}

/// Appends one-event commands from `writers` concurrent writers for `duration`; returns commands recorded per second.
async fn measure_appends(
    store: &Arc<AggregateStore<Probe>>,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let recorded = Arc::new(AtomicU64::new(0));
    let run_id = uuid::Uuid::new_v4();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let store = store.clone();
        let recorded = recorded.clone();
        tasks.push(tokio::spawn(async move {
            let metadata = EventMetadata::new(Actor::System, chrono::Utc::now());
            let mut turn = 0usize;
            while started.elapsed() < duration {
                let aggregate_id = format!("{run_id}-{writer}-{}", turn % AGGREGATES_PER_WRITER);
                turn += 1;
                match store
                    .execute(&aggregate_id, ProbeCommand::Increment { by: 1 }, &metadata)
                    .await
                {
                    Ok(()) => {
                        recorded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(CommandError::Conflict) => {}
                    Err(error) => return Err(anyhow::Error::new(error)),
                }
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(recorded.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Makes `count` one-writer appends while another session holds a REPEATABLE READ transaction open (as a `pg_dump`
/// or a long report does, so that no row version written meanwhile can be pruned); the mean latency of the first
/// and of the last `SNAPSHOT_WINDOW` appends.
async fn measure_appends_under_an_open_snapshot(
    database: &Database,
    pool: &sqlx::PgPool,
    count: u64,
) -> anyhow::Result<(Duration, Duration)> {
    let mut snapshot = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *snapshot)
        .await?;
    sqlx::query("SELECT count(*) FROM events")
        .execute(&mut *snapshot)
        .await?;
    let store = AggregateStore::<Probe>::new(database, ());
    let metadata = EventMetadata::new(Actor::System, chrono::Utc::now());
    let run_id = uuid::Uuid::new_v4();
    let (mut first, mut last) = (Duration::ZERO, Duration::ZERO);
    for append in 0..count {
        let aggregate_id = format!("{run_id}-{}", append % AGGREGATES_PER_WRITER as u64);
        let started = Instant::now();
        store
            .execute(&aggregate_id, ProbeCommand::Increment { by: 1 }, &metadata)
            .await?;
        let took = started.elapsed();
        if append < SNAPSHOT_WINDOW {
            first += took;
        } else if append >= count - SNAPSHOT_WINDOW {
            last += took;
        }
    }
    snapshot.rollback().await?;
    let window = u32::try_from(SNAPSHOT_WINDOW).unwrap_or(u32::MAX);
    Ok((first / window, last / window))
}

/// Writes a host aggregate of `events` events straight into the log (registered, then slots taken and freed in
/// turn), then times a cold load of it from its whole history (which writes its snapshot) and the median of cold
/// loads from that snapshot.
async fn measure_cold_host_loads(
    database: &Database,
    pool: &sqlx::PgPool,
    events: i64,
) -> anyhow::Result<(Duration, Duration)> {
    use whist_domain::instance::Instance;
    let host = format!("bench-host-{}", uuid::Uuid::new_v4().simple());
    let metadata =
        serde_json::to_string(&EventMetadata::new(Actor::System, chrono::Utc::now()).to_map())?;
    let at = chrono::Utc::now().to_rfc3339();
    sqlx::query(
        "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, position)
SELECT 'instance', $1, g,
       CASE WHEN g = 1 THEN 'InstanceRegistered'
            WHEN g % 2 = 0 THEN 'InstanceMandelboxAllocated' ELSE 'InstanceMandelboxFreed' END,
       '1.0',
       CASE WHEN g = 1 THEN json_build_object('Registered', json_build_object(
                'ip', '10.0.0.1', 'mandelbox_capacity', 4, 'auth_token_hash', 'bench', 'at', $4::text))
            WHEN g % 2 = 0 THEN json_build_object('MandelboxAllocated', json_build_object(
                'mandelbox_id', 'm-' || (g / 2), 'user_id', 'u-' || (g / 2), 'live_after', 1, 'at', $4::text))
            ELSE json_build_object('MandelboxFreed', json_build_object(
                'mandelbox_id', 'm-' || (g / 2), 'live_after', 0, 'at', $4::text)) END,
       $3::json, (SELECT position FROM event_log_head) + g
  FROM generate_series(1, $2) AS g",
    )
    .bind(&host)
    .bind(events)
    .bind(metadata)
    .bind(at)
    .execute(pool)
    .await?;
    let started = Instant::now();
    let (_, version) = AggregateStore::<Instance>::new(database, ())
        .load_from_history(&host)
        .await?;
    let whole = started.elapsed();
    anyhow::ensure!(
        i64::try_from(version)? == events,
        "the host loaded at version {version}, not {events}"
    );
    let snapshot_written = Instant::now();
    while sqlx::query_scalar::<_, i64>(
        "SELECT sequence FROM aggregate_snapshots WHERE aggregate_type = 'instance' AND aggregate_id = $1",
    )
    .bind(&host)
    .fetch_optional(pool)
    .await?
        != Some(events)
    {
        anyhow::ensure!(
            snapshot_written.elapsed() < Duration::from_secs(60),
            "the cold load wrote no snapshot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut from_snapshot = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        // A store of its own remembers nothing: every load is cold.
        AggregateStore::<Instance>::new(database, ())
            .load_from_history(&host)
            .await?;
        from_snapshot.push(started.elapsed());
    }
    from_snapshot.sort();
    Ok((whole, from_snapshot[from_snapshot.len() / 2]))
}

/// pgbench running `script` (no vacuum first) over `clients` connections on at most two threads for `seconds`; the
/// caller adds its own options and the database's URL.
fn pgbench(script: &std::path::Path, clients: usize, seconds: u64) -> std::process::Command {
    let mut command = std::process::Command::new("pgbench");
    command
        .arg("-n")
        .arg("-f")
        .arg(script)
        .arg("-c")
        .arg(clients.to_string())
        .arg("-j")
        .arg(clients.min(2).to_string())
        .arg("-T")
        .arg(seconds.to_string());
    command
}

/// Runs pgbench with a one-row insert script at `clients` clients; returns its transactions per second.
pub fn pgbench_one_row_insert(url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let script = std::env::temp_dir().join(format!("whist-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "INSERT INTO pgbench_one_row (payload) VALUES ('{\"Incremented\":{\"by\":1,\"total\":1}}');\n",
    )?;
    let output = pgbench(&script, clients, seconds)
        .arg(url)
        .output()
        .context("Failed to run pgbench (install postgresql-client)")?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("tps = ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|tps| tps.parse::<f64>().ok())
        })
        .context("pgbench printed no tps line")
}

/// What Postgres alone answered at a fixed rate ([`pgbench_at_rate`]).
pub struct RateControl {
    /// Each transaction, in the order of the schedule.
    pub answers: Vec<ControlAnswer>,
    /// Rows each transaction inserted.
    pub rows: u64,
    /// WAL written per transaction, as Postgres counted it over the run.
    pub wal_per_transaction: f64,
}

impl RateControl {
    /// Each transaction's time from its scheduled start, in the order of the schedule.
    pub fn times(&self) -> Vec<Duration> {
        self.answers.iter().map(|answer| answer.took).collect()
    }
}

/// One transaction of [`pgbench_at_rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlAnswer {
    /// When it was scheduled to start, in microseconds since the Unix epoch.
    pub scheduled_us: i64,
    /// Its time from the scheduled start to its end.
    pub took: Duration,
}

/// WAL one row of [`pgbench_at_rate`]'s script writes, a key of 32 characters and 448 of payload with two b-tree
/// indexes (Postgres 15: 6,772 B for a transaction of nine rows); the script inserts as many rows as make the WAL
/// asked for.
const CONTROL_ROW_WAL: f64 = 750.0;

/// The table [`pgbench_at_rate`] inserts into, made if it is missing (a run beside a load makes it before the load,
/// so as not to write the catalog in the load's first second).
pub const RATE_CONTROL_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS pgbench_at_rate (id bigserial PRIMARY KEY, k text NOT NULL, payload text NOT NULL); \
     CREATE INDEX IF NOT EXISTS pgbench_at_rate_k ON pgbench_at_rate (k)";

/// The WAL Postgres has written since it was made, in bytes: the difference of two readings is what was written
/// between them (the load's phases and Postgres alone read it the same way).
pub const WAL_WRITTEN: &str = "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')";

/// Postgres alone at `rate` transactions a second for `seconds` (pgbench `--rate`, whose latencies are timed from
/// each transaction's scheduled start, like the load's open loop), each transaction inserting as many rows as write
/// about `wal_per_transaction` bytes of WAL: the machine's own answer times for the writes an assign makes, at the
/// assigns' rate, measured in the same run.
///
/// # Errors
/// pgbench is missing or failed, or the database could not be reached.
pub async fn pgbench_at_rate(
    url: &str,
    rate: f64,
    seconds: u64,
    clients: usize,
    wal_per_transaction: f64,
) -> anyhow::Result<RateControl> {
    let rows = ((wal_per_transaction / CONTROL_ROW_WAL).round() as u64).max(1);
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    pool.execute(RATE_CONTROL_TABLE).await?;
    let wal = format!("SELECT {WAL_WRITTEN}::float8");
    let wal_before: f64 = sqlx::query_scalar(&wal).fetch_one(&pool).await?;
    // A folder of its own for each run: one may run beside another (the load's open loop keeps one beside it).
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let directory = std::env::temp_dir().join(format!(
        "whist-pgbench-rate-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&directory)?;
    let script = directory.join("script.sql");
    std::fs::write(
        &script,
        format!(
            "INSERT INTO pgbench_at_rate (k, payload) SELECT md5(random()::text), repeat(md5(random()::text), 14) \
             FROM generate_series(1, {rows});\n"
        ),
    )?;
    let mut command = pgbench(&script, clients, seconds);
    command
        .arg("-R")
        .arg(format!("{rate:.0}"))
        .arg("-l")
        .arg(format!("--log-prefix={}", directory.join("log").display()))
        .arg(url);
    // Waited for on the runtime, not a thread of it: a run beside the open loop must not hold up its sends.
    let output = tokio::process::Command::from(command).output().await;
    let logs = read_logs(&directory);
    let _ = std::fs::remove_dir_all(&directory);
    let output = output.context("Failed to run pgbench (install postgresql-client)")?;
    let logs = logs?;
    let wal_after: f64 = sqlx::query_scalar(&wal).fetch_one(&pool).await?;
    pool.close().await;
    if !output.status.success() {
        anyhow::bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let answers = scheduled_answers(&logs);
    Ok(RateControl {
        wal_per_transaction: (wal_after - wal_before) / (answers.len().max(1) as f64),
        answers,
        rows,
    })
}

/// The per-transaction logs pgbench wrote into `directory` (`log.<pid>` and `log.<pid>.<thread>`), one after another.
fn read_logs(directory: &std::path::Path) -> std::io::Result<String> {
    let mut logs = String::new();
    for entry in std::fs::read_dir(directory)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("log."))
        {
            logs.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    Ok(logs)
}

/// Each transaction, in the order of the schedule, from pgbench's per-transaction logs (`client transaction time_us
/// script epoch_s epoch_us lag_us`: under `--rate` the time counts from the scheduled start, and the epoch is the
/// transaction's end).
fn scheduled_answers(logs: &str) -> Vec<ControlAnswer> {
    let mut answers: Vec<ControlAnswer> = logs
        .lines()
        .filter_map(|line| {
            let fields: Vec<i64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let (took, seconds, micros) = (*fields.get(2)?, *fields.get(4)?, *fields.get(5)?);
            let ended = seconds * 1_000_000 + micros;
            Some(ControlAnswer {
                scheduled_us: ended - took,
                took: Duration::from_micros(u64::try_from(took).ok()?),
            })
        })
        .collect();
    answers.sort_by_key(|answer| answer.scheduled_us);
    answers
}

/// Fills the log with `count` probe events across `count / 10` aggregates, positions already given, as fast as
/// Postgres can insert them (the rebuild is what is measured, not this).
async fn load_synthetic_log(pool: &sqlx::PgPool, count: i64) -> anyhow::Result<i64> {
    let started = Instant::now();
    let base: i64 = sqlx::query_scalar("SELECT position FROM event_log_head WHERE id = 1")
        .fetch_one(pool)
        .await?;
    let metadata =
        serde_json::to_string(&EventMetadata::new(Actor::System, chrono::Utc::now()).to_map())?;
    sqlx::query(
        "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, position)
SELECT 'probe', 'synthetic-' || ((g - 1) / 10), ((g - 1) % 10) + 1, 'ProbeIncremented', '1.0',
       json_build_object('Incremented', json_build_object('by', 1, 'total', ((g - 1) % 10) + 1)),
       $2::json, $3 + g
  FROM generate_series(1, $1) AS g",
    )
    .bind(count)
    .bind(metadata)
    .bind(base)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE events").execute(pool).await?;
    tracing::info!(
        count,
        seconds = started.elapsed().as_secs_f64(),
        "synthetic log loaded"
    );
    Ok(base + count)
}

fn redact(url: &str) -> String {
    whist_adapters::store::redact_url(url)
}

/// The same server URL with another database name.
pub fn with_database(url: &str, database: &str) -> String {
    replace_database(url, database)
}

fn replace_database(url: &str, database: &str) -> String {
    let (without_query, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = without_query.find("://").map(|at| at + 3).unwrap_or(0);
    let base = match without_query[scheme_end..].find('/') {
        Some(slash) => &without_query[..scheme_end + slash],
        None => without_query,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{replace_database, scheduled_answers};

    #[test]
    fn pgbench_answers_come_in_the_order_of_their_schedule() {
        // Two clients' logs: the second client's transaction was scheduled first (ended later, took longer).
        let logs = "0 1 2000 0 100 5000 10\n\
                    0 2 1000 0 100 9000 0\n\
                    1 1 4500 0 100 5500 300\n\
                    not a log line\n";
        let answers = scheduled_answers(logs);
        let took: Vec<Duration> = answers.iter().map(|answer| answer.took).collect();
        assert_eq!(
            took,
            [
                Duration::from_micros(4500),
                Duration::from_micros(2000),
                Duration::from_micros(1000)
            ]
        );
        assert_eq!(
            answers.first().map(|answer| answer.scheduled_us),
            Some(100 * 1_000_000 + 5500 - 4500)
        );
    }

    #[test]
    fn the_benchmark_database_replaces_the_one_in_the_url() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            replace_database("postgres://u:p@h/db?sslmode=disable", "b"),
            "postgres://u:p@h/b?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h", "b"), "postgres://h/b");
    }
}
