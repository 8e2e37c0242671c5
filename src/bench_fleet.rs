//! `whist bench fleet`: the autoscaler's decision time over a large read model, and the reconciler's side effects
//! per second against an EC2 API (moto's server on loopback, started here unless `--aws-endpoint-url` names one),
//! beside the rate that same EC2 API answers the same calls when called directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::Executor;
use whist_adapters::config::{Settings, Sources};
use whist_adapters::ec2::{Ec2, Ec2Access, LaunchRequest};
use whist_adapters::store::{Backend, Database};
use whist_api::services::Services;
use whist_api::workers::autoscaler::Autoscaler;
use whist_api::workers::background::Background;
use whist_api::Context as ControlContext;
use whist_domain::images::{ImageCatalogCommand, CATALOG_ID};
use whist_domain::instance::{InstanceCommand, LaunchSpec, TerminationReason};
use whist_domain::{Actor, EventMetadata};
use whist_projections::ProjectionRunner;

/// Options of `whist bench fleet`.
#[derive(Debug, clap::Args)]
pub struct FleetBenchOptions {
    #[command(flatten)]
    server: crate::bench::BenchServer,
    /// The URL of the EC2 API to launch on (`http://127.0.0.1:5000`); unset, `moto_server` is started on a free
    /// loopback port.
    #[arg(long)]
    aws_endpoint_url: Option<String>,
    /// Hosts in the read model for the decision benchmark.
    #[arg(long, default_value_t = 10_000)]
    hosts: i64,
    /// Mandelboxes in the read model for the decision benchmark.
    #[arg(long, default_value_t = 100_000)]
    mandelboxes: i64,
    /// Regions the hosts are spread over.
    #[arg(long, default_value_t = 5)]
    regions: usize,
    /// Decision passes timed.
    #[arg(long, default_value_t = 50)]
    passes: usize,
    /// Launch decisions the reconciler carries out (and then terminates).
    #[arg(long, default_value_t = 200)]
    launches: usize,
}

const IMAGE: &str = "ami-12c6146b";
const REGIONS: [&str; 8] = [
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-south-1",
    "ca-central-1",
];

struct MotoServer(std::process::Child);

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn fleet(options: FleetBenchOptions) -> anyhow::Result<()> {
    let regions: Vec<&str> = REGIONS
        .iter()
        .copied()
        .take(options.regions.clamp(1, REGIONS.len()))
        .collect();
    let (_moto, endpoint) = match &options.aws_endpoint_url {
        Some(endpoint) => (None, endpoint.clone()),
        None => {
            let port = crate::loadtest::free_port()?;
            let child = std::process::Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("moto_server is not installed (pip install 'moto[server]')")?;
            (Some(MotoServer(child)), format!("http://127.0.0.1:{port}"))
        }
    };
    let database_name = format!("whist_bench_fleet_{}", std::process::id());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&options.server.database_url)
        .await
        .context("Failed to connect to the Postgres server named by --database-url")?;
    admin
        .execute(format!("CREATE DATABASE {database_name}").as_str())
        .await?;
    let url = crate::bench::with_database(&options.server.database_url, &database_name);
    let outcome = run(&options, &url, &endpoint, &regions).await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {database_name} WITH (FORCE)").as_str())
        .await?;
    outcome
}

async fn state(
    url: &str,
    endpoint: &str,
    regions: &[&str],
) -> anyhow::Result<(ControlContext, Background)> {
    let mut sources = Sources::default();
    for (key, value) in [
        ("ENVIRONMENT", "local".to_string()),
        ("DATABASE_URL", url.to_string()),
        ("WHIST_CLOUD", "aws".to_string()),
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "bench".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "bench".to_string()),
        ("WHIST_DEPLOYMENT", "whist-bench".to_string()),
        ("HOST_NETWORK_CIDRS", r#"["127.0.0.0/8"]"#.to_string()),
        ("ENABLED_REGIONS", serde_json::json!(regions).to_string()),
        // The benchmark makes the decisions; the reconciler carries them out.
        ("WHIST_AUTOSCALE", "false".to_string()),
        ("WHIST_REPAIR_INTERVAL_S", "3600".to_string()),
    ] {
        sources.environment.insert(key.to_string(), value);
    }
    let settings = Settings::from_sources(&sources)?;
    let database = Database::connect(
        Some(url),
        std::path::Path::new("."),
        whist_adapters::store::PoolSettings::sized(20),
    )
    .await?;
    database.migrate().await?;
    let projections = ProjectionRunner::new(database.clone(), whist_projections::all());
    let services = Arc::new(Services::new(&settings, &database).await?);
    let state = ControlContext::new(
        Arc::new(settings),
        database.clone(),
        projections.clone(),
        services,
    );
    let background = Background::start(&database, projections);
    Ok((state, background))
}

async fn run(
    options: &FleetBenchOptions,
    url: &str,
    endpoint: &str,
    regions: &[&str],
) -> anyhow::Result<()> {
    let (state, background) = state(url, endpoint, regions).await?;
    let metadata = || EventMetadata::new(Actor::System, chrono::Utc::now());
    state
        .services
        .catalog
        .execute(
            CATALOG_ID,
            ImageCatalogCommand::Activate {
                client_commit_hash: "bench".to_string(),
                images: regions
                    .iter()
                    .map(|region| (region.to_string(), IMAGE.to_string()))
                    .collect(),
                at: chrono::Utc::now(),
            },
            &metadata(),
        )
        .await?;

    // 1. The decision over a large read model: rows written straight into the read models (what millions of
    // events would have projected), hosts of every state and fill, spread over the regions.
    let region_list: Vec<String> = regions.iter().map(|region| region.to_string()).collect();
    sqlx::query(
        "INSERT INTO instances (instance_id, cloud_instance_id, region, image_id, client_commit_hash, instance_type, \
         ip, status, mandelbox_capacity, live_mandelboxes, launched_at, updated_at) \
         SELECT 'bench-host-' || n, 'i-' || n, ($2::text[])[1 + n % array_length($2::text[], 1)], \
           CASE WHEN n % 10 = 0 THEN 'ami-old' ELSE $3 END, 'bench', 'g4dn.2xlarge', '10.0.0.1', \
           CASE WHEN n % 50 = 0 THEN 'PRE_CONNECTION' WHEN n % 25 = 0 THEN 'DRAINING' ELSE 'ACTIVE' END, \
           12, 0, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00' \
         FROM generate_series(1, $1) AS n",
    )
    .bind(options.hosts)
    .bind(&region_list)
    .bind(IMAGE)
    .execute(postgres(&state)?)
    .await?;
    sqlx::query(
        "INSERT INTO mandelboxes (mandelbox_id, instance_id, user_id, session_id, region, ip, status, created_at, \
         updated_at) \
         SELECT 'bench-mandelbox-' || n, 'bench-host-' || (1 + n % $2), 'user-' || n, n, 'us-east-1', '10.0.0.1', \
           'RUNNING', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00' \
         FROM generate_series(1, $1) AS n",
    )
    .bind(options.mandelboxes)
    .bind(options.hosts)
    .execute(postgres(&state)?)
    .await?;
    sqlx::query(
        "UPDATE instances i SET live_mandelboxes = LEAST(i.mandelbox_capacity, m.live) \
         FROM (SELECT instance_id, count(*) AS live FROM mandelboxes GROUP BY instance_id) m \
         WHERE m.instance_id = i.instance_id AND i.status <> 'PRE_CONNECTION'",
    )
    .execute(postgres(&state)?)
    .await?;
    sqlx::query("ANALYZE instances")
        .execute(postgres(&state)?)
        .await?;
    let autoscaler = Autoscaler::new(state.clone());
    let mut timings = Vec::with_capacity(options.passes);
    let mut planned = Vec::new();
    for _ in 0..options.passes {
        let started = Instant::now();
        planned = autoscaler.plan().await.map_err(anyhow::Error::msg)?;
        timings.push(started.elapsed());
    }
    timings.sort();
    let percentile = |share: f64| {
        let index = ((timings.len() as f64 - 1.0) * share).round() as usize;
        timings[index.min(timings.len() - 1)].as_secs_f64() * 1000.0
    };
    println!(
        "whist bench fleet: {} hosts, {} mandelboxes, {} regions, Postgres database {}",
        options.hosts,
        options.mandelboxes,
        regions.len(),
        whist_adapters::store::redact_url(url)
    );
    println!(
        "autoscaler decision (read + plan, all regions): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} passes (target < 100 ms)",
        percentile(0.5),
        percentile(0.99),
        percentile(1.0),
        timings.len()
    );
    for decision in &planned {
        println!(
            "  {}: free {} of desired {} -> launch {}, drain {}",
            decision.region,
            decision.plan.free,
            decision.plan.desired,
            decision.plan.launch,
            decision.plan.drain.len()
        );
    }

    // 2. The reconciler against EC2: launch decisions recorded at once, carried out by the reconciler, then
    // terminated; side effects per second from the first decision to the last outcome recorded.
    sqlx::query("DELETE FROM instances")
        .execute(postgres(&state)?)
        .await?;
    let control = Background::start_control(&state);
    let mut ids = Vec::with_capacity(options.launches);
    let started = Instant::now();
    for index in 0..options.launches {
        let id = uuid::Uuid::new_v4().to_string();
        state
            .services
            .instances
            .execute(
                &id,
                InstanceCommand::RequestLaunch {
                    spec: LaunchSpec {
                        region: regions[index % regions.len()].to_string(),
                        image_id: IMAGE.to_string(),
                        client_commit_hash: "bench".to_string(),
                        instance_type: "g4dn.2xlarge".to_string(),
                    },
                    bootstrap_token_hash: "bench".to_string(),
                    reason: whist_domain::instance::LaunchReason::WarmBuffer,
                    at: chrono::Utc::now(),
                },
                &metadata(),
            )
            .await?;
        ids.push(id);
    }
    wait_for(&state, "cloud_instance_id IS NOT NULL", ids.len()).await?;
    let launch_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for id in &ids {
        state
            .services
            .instances
            .execute(
                id,
                InstanceCommand::Terminate {
                    reason: TerminationReason::Operator,
                    at: chrono::Utc::now(),
                },
                &metadata(),
            )
            .await?;
    }
    wait_for(&state, "status = 'TERMINATED'", ids.len()).await?;
    let terminate_seconds = started.elapsed().as_secs_f64();
    control.stop().await;
    background.stop().await;
    state.database.close().await;

    // The same EC2 API called directly, 16 at a time (the reconciler's batch): its own limit for these calls.
    let direct = direct_launch_rate(endpoint, regions, options.launches).await?;
    let launches = ids.len() as f64;
    println!(
        "reconciler launches: {:.1}/s ({} in {:.2} s, decision to outcome recorded); EC2 RunInstances called directly: {:.1}/s -> {:.0}%",
        launches / launch_seconds,
        ids.len(),
        launch_seconds,
        direct,
        100.0 * launches / launch_seconds / direct.max(1e-9)
    );
    println!(
        "reconciler terminations: {:.1}/s ({} in {:.2} s)",
        launches / terminate_seconds,
        ids.len(),
        terminate_seconds
    );
    Ok(())
}

fn postgres(state: &ControlContext) -> anyhow::Result<&sqlx::PgPool> {
    match state.database.backend() {
        Backend::Postgres(pool) => Ok(pool),
        Backend::Sqlite(_) => anyhow::bail!("the fleet benchmark needs Postgres"),
    }
}

async fn wait_for(state: &ControlContext, condition: &str, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM instances WHERE {condition}"))
                .fetch_one(state.database.any())
                .await?;
        if usize::try_from(done).unwrap_or(0) >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {count} side effects were recorded within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn direct_launch_rate(
    endpoint: &str,
    regions: &[&str],
    launches: usize,
) -> anyhow::Result<f64> {
    let ec2 = Ec2::new(
        "whist-bench-direct",
        Ec2Access {
            endpoint_url: Some(endpoint.to_string()),
            static_credentials: Some(("bench".to_string(), "bench".to_string())),
        },
    );
    let started = Instant::now();
    let mut done = 0;
    while done < launches {
        let batch: Vec<_> = (done..launches.min(done + 16))
            .map(|index| {
                let ec2 = ec2.clone();
                let request = LaunchRequest {
                    launch_id: uuid::Uuid::new_v4().to_string(),
                    region: regions[index % regions.len()].to_string(),
                    image_id: IMAGE.to_string(),
                    instance_type: "g4dn.2xlarge".to_string(),
                    user_data: String::new(),
                };
                tokio::spawn(async move { ec2.launch(&request).await })
            })
            .collect();
        done += batch.len();
        for task in batch {
            task.await?.map_err(|error| anyhow::anyhow!("{error}"))?;
        }
    }
    Ok(launches as f64 / started.elapsed().as_secs_f64())
}
