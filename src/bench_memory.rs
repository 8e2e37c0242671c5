//! `whist bench memory`: the resident memory of a live `whist serve` that tracks a large fleet with a long history:
//! `--hosts` hosts (launched, registered) and `--allocations` slots taken and freed on them in its log, every host
//! heard from once, and some assigns served; the server's RSS is printed next to its target.

use std::time::{Duration, Instant};

use anyhow::Context;
use cqrs_es::DomainEvent;
use futures::StreamExt;
use whist_adapters::store::{Backend, Database, PoolSettings, SessionLimits};
use whist_adapters::tokens::{fingerprint, Purpose, Tokens};
use whist_domain::instance::{InstanceEvent, LaunchReason, LaunchSpec};
use whist_domain::{Actor, EventMetadata};

/// Options of `whist bench memory`.
#[derive(Debug, clap::Args)]
pub struct MemoryBenchOptions {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// Hosts in the log, each launched and registered, and heard from once.
    #[arg(long, default_value_t = 100_000)]
    hosts: usize,
    /// Slots taken and freed in the log, spread over the hosts.
    #[arg(long, default_value_t = 1_000_000)]
    allocations: usize,
    /// Assigns served once the server has caught up.
    #[arg(long, default_value_t = 2_000)]
    assigns: usize,
}

/// The target: the resident memory of a server tracking 100,000 hosts.
const TARGET_MB: f64 = 300.0;
const REGION: &str = "us-east-1";
const HASH: &str = "bench-memory";
/// Events per insert statement.
const ROWS_PER_STATEMENT: usize = 20_000;

pub async fn memory(options: MemoryBenchOptions) -> anyhow::Result<()> {
    let scratch =
        crate::bench::ScratchDatabase::create(&options.server.database_url, "whist_bench_memory")
            .await?;
    let outcome = run(&options, &scratch.url).await;
    scratch.drop_it().await?;
    outcome
}

/// One event row to insert.
struct Row {
    id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
}

fn row(id: &str, sequence: i64, event: &InstanceEvent) -> anyhow::Result<Row> {
    Ok(Row {
        id: id.to_string(),
        sequence,
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_string(event)?,
    })
}

async fn insert(pool: &sqlx::PgPool, rows: &[Row], metadata: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
         position) SELECT 'instance', i.id, i.sequence, i.event_type, i.event_version, i.payload::json, $6::json, \
         (SELECT position FROM event_log_head) + i.ordinal \
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY \
         AS i(id, sequence, event_type, event_version, payload, ordinal)",
    )
    .bind(rows.iter().map(|row| row.id.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|row| row.sequence).collect::<Vec<_>>())
    .bind(rows.iter().map(|row| row.event_type.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|row| row.event_version.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|row| row.payload.clone()).collect::<Vec<_>>())
    .bind(metadata)
    .execute(pool)
    .await?;
    Ok(())
}

/// Writes the fleet's history straight into the log: every host's launch, registration, then the allocations in
/// rounds over the hosts, in position order.
async fn write_history(
    database: &Database,
    tokens: &Tokens,
    options: &MemoryBenchOptions,
) -> anyhow::Result<Vec<String>> {
    let Backend::Postgres(pool) = database.backend() else {
        anyhow::bail!("the memory benchmark needs Postgres");
    };
    let metadata =
        serde_json::to_string(&EventMetadata::new(Actor::System, chrono::Utc::now()).to_map())?;
    let at = chrono::Utc::now();
    let hosts: Vec<String> = (0..options.hosts)
        .map(|index| format!("bench-host-{index:06}"))
        .collect();
    let mut rows = Vec::with_capacity(ROWS_PER_STATEMENT);
    for (index, host) in hosts.iter().enumerate() {
        let launch = InstanceEvent::LaunchRequested {
            spec: LaunchSpec {
                region: REGION.to_string(),
                image_id: "ami-bench".to_string(),
                instance_type: "g4dn.2xlarge".to_string(),
                client_commit_hash: HASH.to_string(),
            },
            bootstrap_token_hash: fingerprint(&tokens.derive(Purpose::Bootstrap, host)),
            reason: LaunchReason::WarmBuffer,
            at,
        };
        let launched = InstanceEvent::Launched {
            cloud_instance_id: format!("i-{index:017x}"),
            at,
        };
        let registered = InstanceEvent::Registered {
            // Loopback addresses: a call planned for one of these hosts can reach nothing but this machine.
            ip: format!(
                "127.{}.{}.{}",
                1 + index / 65_536 % 255,
                index / 256 % 256,
                index % 256
            ),
            mandelbox_capacity: 4,
            auth_token_hash: fingerprint(&tokens.derive(Purpose::HostAuth, host)),
            tls_cert_sha256: None,
            at,
        };
        for (sequence, event) in [(1, launch), (2, launched), (3, registered)] {
            rows.push(row(host, sequence, &event)?);
        }
        if rows.len() >= ROWS_PER_STATEMENT {
            insert(pool, &rows, &metadata).await?;
            rows.clear();
        }
    }
    for allocation in 0..options.allocations {
        let host = &hosts[allocation % hosts.len()];
        let round = i64::try_from(allocation / hosts.len())?;
        let mandelbox_id = format!("bench-mandelbox-{allocation}");
        let taken = InstanceEvent::MandelboxAllocated {
            mandelbox_id: mandelbox_id.clone(),
            user_id: format!("bench-user-{}", allocation % 10_000),
            live_after: 1,
            at,
        };
        let freed = InstanceEvent::MandelboxFreed {
            mandelbox_id,
            live_after: 0,
            at,
        };
        rows.push(row(host, 4 + 2 * round, &taken)?);
        rows.push(row(host, 5 + 2 * round, &freed)?);
        if rows.len() >= ROWS_PER_STATEMENT {
            insert(pool, &rows, &metadata).await?;
            rows.clear();
        }
    }
    if !rows.is_empty() {
        insert(pool, &rows, &metadata).await?;
    }
    Ok(hosts)
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The resident set and its peak, in MB, from `/proc/{pid}/status`.
fn memory_of(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kilobytes: f64 = line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?;
        Ok(kilobytes / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

async fn run(options: &MemoryBenchOptions, url: &str) -> anyhow::Result<()> {
    anyhow::ensure!(options.hosts > 0, "--hosts must be at least 1");
    println!(
        "whist bench memory: {} hosts, {} allocations in the log",
        options.hosts, options.allocations
    );
    let database = Database::connect(
        Some(url),
        std::path::Path::new("."),
        PoolSettings {
            max_connections: 4,
            limits: SessionLimits::none(),
        },
    )
    .await?;
    database.migrate().await?;
    let tokens = Tokens::load(&database).await?;
    let writing = Instant::now();
    let hosts = write_history(&database, &tokens, options).await?;
    let head = database.log().head().await?;
    println!(
        "{:<44} {:>10} events in {:.1} s",
        "history written",
        head,
        writing.elapsed().as_secs_f64()
    );

    let port = crate::loadtest::free_port()?;
    let data_dir = std::env::temp_dir().join(format!("whist-memory-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;
    let server = Server(
        std::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .current_dir(&data_dir)
            .env("DATABASE_URL", url)
            .env("PORT", port.to_string())
            .env("ENVIRONMENT", "local")
            .env("WHIST_CLOUD", "aws")
            .env("WHIST_DEPLOYMENT", "whist-bench-memory")
            .env("WHIST_AUTOSCALE", "false")
            .env("ENABLED_REGIONS", format!("[\"{REGION}\"]"))
            .env("HOST_NETWORK_CIDRS", r#"["127.0.0.0/8"]"#)
            // EC2 is never called for real: a loopback port nothing listens on.
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", crate::loadtest::free_port()?),
            )
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            // The hosts are heard from once: they must not be judged silent while the benchmark runs.
            .env("HEARTBEAT_TIMEOUT_S", "3600")
            .env("ASSIGN_RATE_LIMIT_PER_MINUTE", "0")
            .env("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0")
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("Failed to start whist serve")?,
    );
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Caught up: every projection at the head.
    let catching_up = Instant::now();
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_checkpoints WHERE position < (SELECT position FROM event_log_head)",
        )
        .fetch_one(database.any())
        .await?;
        let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_checkpoints")
            .fetch_one(database.any())
            .await?;
        if behind == 0 && registered > 0 {
            break;
        }
        anyhow::ensure!(
            catching_up.elapsed() < Duration::from_secs(900),
            "the projections did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let caught_up = catching_up.elapsed();
    let (after_catch_up, _) = memory_of(pid)?;

    // Every host is heard from once.
    let heard = futures::stream::iter(hosts.iter().enumerate())
        .map(|(number, host)| {
            let client = client.clone();
            let base = base.clone();
            let authorization = tokens.derive(Purpose::HostAuth, host);
            let body = whist_adapters::simulated_host::heartbeat_body(
                host,
                i64::try_from(number).unwrap_or(0),
            );
            async move {
                client
                    .post(format!("{base}/host/heartbeat"))
                    .bearer_auth(authorization)
                    .json(&body)
                    .send()
                    .await
                    .map(|response| response.status().is_success())
                    .unwrap_or(false)
            }
        })
        .buffer_unordered(32)
        .filter(|accepted| std::future::ready(*accepted))
        .count()
        .await;

    // Assigns, each by a user of its own (developers: no subscription needed).
    let mut served = 0usize;
    for assign in 0..options.assigns {
        let token = whist_adapters::auth::dev_token(
            &format!("bench-memory-user-{assign}"),
            true,
            Duration::from_secs(3600),
        )?;
        let answer = client
            .post(format!("{base}/mandelbox/assign"))
            .bearer_auth(token)
            .json(&serde_json::json!({
                "regions": [REGION],
                "client_commit_hash": HASH,
                "session_id": 1,
                "user_email": "bench@example.com",
            }))
            .send()
            .await?;
        if answer.status().is_success() {
            served += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (resident, peak) = memory_of(pid)?;
    println!(
        "{:<44} {:>10.1} s",
        "projections caught up after",
        caught_up.as_secs_f64()
    );
    println!("{:<44} {:>10}", "hosts heard from (heartbeat 200)", heard);
    println!("{:<44} {:>10}", "assigns served (200)", served);
    println!(
        "{:<44} {:>10.0} MB",
        "serve RSS after catching up", after_catch_up
    );
    println!(
        "{:<44} {:>10.0} MB (peak {:.0} MB; target <= {TARGET_MB:.0} MB)",
        "serve RSS tracking the fleet", resident, peak
    );
    drop(server);
    database.close().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}
