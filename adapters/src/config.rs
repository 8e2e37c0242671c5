//! Typed settings. Each key is read from the environment first, then from the config database (`CONFIG_DB_URL`,
//! a table named after the stage with columns `key` and `value`), then a default. A key that is present but
//! malformed stops start-up with a message naming the key (never its value: it may be a secret).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A value that must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("[redacted]")
    }
}

/// One key of `WHIST_TOKEN_KEYS`: its id (carried by every token it signs) and its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKey {
    pub id: String,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TokenKey")
            .field("id", &self.id)
            .field("bytes", &"[redacted]")
            .finish()
    }
}

/// The shortest token key `WHIST_TOKEN_KEYS` accepts, in bytes.
pub const MIN_TOKEN_KEY_BYTES: usize = 32;

/// The stage this process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Local,
    Dev,
    Staging,
    Prod,
}

impl Environment {
    /// The config database's table for this stage (`local` reads the `dev` table).
    pub fn config_table(self) -> &'static str {
        match self {
            Self::Local | Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Prod => "prod",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Dev => "dev",
            Self::Staging => "staging",
            Self::Prod => "prod",
        }
    }
}

/// Where hosts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudKind {
    /// EC2 through aws-sdk-ec2.
    Aws,
    /// Simulated hosts in this process that speak the host protocol over real HTTP.
    Local,
}

/// Auth0 settings for checking desktop-app and admin tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Auth0Settings {
    pub audience: Option<String>,
    /// Where the signing keys are; derived from `AUTH0_DOMAIN` unless `AUTH0_JWKS_URL` is set.
    pub jwks_url: Option<String>,
    /// The expected `iss`; derived from `AUTH0_DOMAIN` unless `AUTH0_ISSUER` is set.
    pub issuer: Option<String>,
    /// `AUTH0_CA_PEM`: CA certificates the JWKS endpoint's certificate must chain to instead of the public web
    /// roots (a private identity provider). Unset: the public roots.
    pub ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

/// Stripe credentials and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeSettings {
    pub secret: Option<Secret>,
    pub webhook_secret: Option<Secret>,
    pub price_id: Option<String>,
    pub api_base: String,
    /// Days of trial Checkout offers a user who never subscribed (`STRIPE_TRIAL_DAYS`, 0 for none).
    pub trial_days: u32,
    /// Where Checkout and the billing portal send the user back to (`PAYMENT_RETURN_URL`).
    pub return_url: String,
}

/// How EC2 is reached (`WHIST_CLOUD=aws`). Unset keys fall back to the AWS SDK's own chain (environment, profile,
/// instance role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// `AWS_ENDPOINT_URL`: another EC2 endpoint (moto on loopback in tests).
    pub endpoint_url: Option<String>,
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, when both are set.
    pub static_credentials: Option<(String, Secret)>,
    /// `WHIST_DEPLOYMENT`: the tag value that marks this deployment's instances. Required with `WHIST_CLOUD=aws`
    /// (two deployments sharing a tag would terminate each other's hosts in repair); `local` otherwise.
    pub deployment: String,
}

/// Every setting the webserver reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Postgres event store; `None` means the embedded SQLite store in `data_dir`.
    pub database_url: Option<Secret>,
    /// `DATABASE_DIRECT_URL`: a session-mode connection to the same database when `DATABASE_URL` goes through a
    /// transaction-mode pooler, for `LISTEN` and migrations. `None`: `DATABASE_URL` is direct.
    pub database_direct_url: Option<Secret>,
    /// `WHIST_DB_POOL_SIZE` (20, at least 2): connections per pool to Postgres (a process keeps two pools; the append
    /// flusher and the hottest reads keep a few for themselves, `store::held`). Many processes on one server
    /// (tests, a fleet of workers) must fit in its `max_connections`.
    pub database_pool_size: u32,
    /// Limits on every session of the store's pools: `WHIST_DB_STATEMENT_TIMEOUT_S` (60),
    /// `WHIST_DB_LOCK_TIMEOUT_S` (10), `WHIST_DB_IDLE_IN_TRANSACTION_TIMEOUT_S` (30); 0 turns one off.
    pub database_session_limits: crate::store::SessionLimits,
    pub data_dir: PathBuf,
    pub environment: Environment,
    pub port: u16,
    pub cloud: CloudKind,
    pub auth0: Auth0Settings,
    pub stripe: StripeSettings,
    pub aws: AwsSettings,
    pub enabled_regions: Vec<String>,
    pub desired_free_mandelboxes: u32,
    /// Per-region overrides of the warm buffer, keyed by region name (`us-east-1`).
    pub desired_free_mandelboxes_by_region: HashMap<String, u32>,
    pub mandelbox_limit_per_user: u32,
    pub instance_type: String,
    pub host_service_port: u16,
    /// `HOST_SERVICE_SCHEME` (`https`): how host services are called.
    pub host_service_scheme: String,
    /// `HOST_SERVICE_CA_PEM`: the CA certificates that sign host-service certificates. Unset, every host is pinned
    /// by the certificate fingerprint it registered.
    pub host_service_ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
    pub public_url: String,
    pub heartbeat_timeout: Duration,
    /// How long a mandelbox may stay `ALLOCATED` before it dies (`WHIST_STALE_ALLOCATION_S`, 90 s).
    pub stale_allocation_timeout: Duration,
    pub assign_rate_limit_per_minute: u32,
    pub assign_rate_limit_per_ip_per_minute: u32,
    /// `WHIST_ASSIGN_CONCURRENCY` (64): the most assigns one `serve` process decides at once. One more answers
    /// `429` with `Retry-After: 1` at once, so that under more load than the process can take its queue, and with it
    /// every answer's time and how long each slot is held, stays bounded instead of growing without end.
    pub assign_concurrency: u32,
    /// `WHIST_ASSIGN_QUEUE_MS` (100): how long the bound of `WHIST_ASSIGN_CONCURRENCY` may stay full while the
    /// assigns that find it full wait for a place. A bound full for less is a stall, which passes (a pause of the
    /// machine or of the database at half load holds 64 assigns within tens of milliseconds); full for longer, it is
    /// more load than the process takes, and every assign that finds it full is answered `429` at once, as a queue
    /// would only grow, until one finds half the places free. 0: answered `429` at once, always.
    pub assign_queue: Duration,
    pub hirefire_token: Option<Secret>,
    pub fleet: FleetSettings,
    /// `WHIST_TOKEN_KEYS`: the keys that derive host, bootstrap and protocol tokens, the first one signing. Required
    /// outside `local`; empty in `local` when unset (a key is then generated and kept in the event database).
    pub token_keys: Vec<TokenKey>,
    /// `TRUSTED_PROXIES`: the load balancers in front of the webserver, whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `HOST_NETWORK_CIDRS`: the networks a host's registered address must fall in.
    pub host_network_cidrs: Vec<ipnet::IpNet>,
    /// `MAX_MANDELBOX_CAPACITY` (64): the most mandelboxes one host may declare at registration.
    pub max_mandelbox_capacity: u32,
    /// `JWKS_CACHE_TTL_S` (600): how long fetched Auth0 signing keys are trusted before they must be fetched again.
    pub jwks_cache_ttl: Duration,
    /// `SWEEP_MAX_SILENT_FRACTION` (0.5): when more than this share of a region's registered hosts are silent at
    /// once, the sweeper terminates none of them (our heartbeat path is broken, not the fleet).
    pub sweep_max_silent_fraction: f64,
    /// `WHIST_HTTP_HEADER_TIMEOUT_S` (15): a connection that has not sent a whole request head this long after it
    /// opened, or after its previous answer, is closed (slowloris).
    pub http_header_timeout: Duration,
    /// `WHIST_FAULT_PANIC_LOOP` (unset): fault injection for resilience tests — the named background loop panics
    /// once, shortly after it starts, so that its supervisor can be seen restarting it.
    pub fault_panic_loop: Option<String>,
    /// `WHIST_AUTO_MIGRATE` (true): whether `serve` and `worker` apply the migrations on start. A deployment whose
    /// release step runs `whist migrate` (the Procfile's) sets it to false; those processes then refuse to start on
    /// a schema behind their own.
    pub auto_migrate: bool,
    /// `SHUTDOWN_GRACE_S` (20): after SIGTERM, how long `serve` finishes the requests it has and `worker` its
    /// loops' current step, before exiting anyway (Heroku kills at 30 s).
    pub shutdown_grace: Duration,
}

/// How the fleet is kept: the autoscaler, the repair against the cloud, and the timeouts that end hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `WHIST_AUTOSCALE` (`true`): whether this deployment's autoscaler launches and drains hosts. Off, hosts come
    /// only from operators (and tests); everything else (jobs, repair, timeouts) still runs.
    pub autoscale: bool,
    /// `WHIST_HOST_CAPACITY` (4): the mandelboxes a host of the configured instance type is expected to hold,
    /// counted for hosts still booting (a host reports its own capacity when it registers) and given to simulated
    /// hosts.
    pub host_capacity: u32,
    /// `WHIST_REGISTRATION_TIMEOUT_S` (900): a host that has not registered this long after its launch decision is
    /// terminated.
    pub registration_timeout: Duration,
    /// `WHIST_DRAINED_HOST_TIMEOUT_S` (120): a draining host that stays empty this long is terminated.
    pub drained_host_timeout: Duration,
    /// `WHIST_REPAIR_INTERVAL_S` (60): how often recorded hosts are compared with the cloud.
    pub repair_interval: Duration,
    /// `WHIST_JOB_CLAIM_S` (60): how long a claimed side-effect job is another process's to take over if its
    /// claimant stops renewing it (the claimant renews it every third of this while the job runs).
    pub job_claim: Duration,
    /// `WHIST_FAULT_PAUSE_AFTER_LAUNCH_MS` (0): fault injection for crash tests — pause this long after EC2
    /// accepted a launch and before the outcome is recorded, logging `launch call returned` first.
    pub fault_pause_after_launch: Duration,
    /// `WHIST_LEADER_LEASE_S` (15): how long the fleet's leader holds its lease without renewing it (it renews every
    /// pass, every 2 s); a leader that stops is replaced this long after its last renewal at most.
    pub leader_lease: Duration,
    /// `WHIST_FAULT_PAUSE_BEFORE_DECIDING_MS` (0): fault injection for failover tests — the leader logs
    /// `autoscaler pass planned` and waits this long before recording the pass's decisions.
    pub fault_pause_before_deciding: Duration,
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key {key} is malformed: {expected}")]
    Malformed { key: String, expected: &'static str },
    #[error("configuration key {key} is required: {why}")]
    Missing {
        key: &'static str,
        why: &'static str,
    },
    #[error("could not read the config database table {table}")]
    ConfigDatabase {
        table: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// Where values come from, in order: the environment, then the config database.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub environment: HashMap<String, String>,
    pub config_database: HashMap<String, String>,
    /// Every key read so far, with its default when it has one (for [`Sources::report`]).
    read: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Option<String>>>>,
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Environment,
    ConfigDatabase,
    Default,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Environment => "environment",
            Self::ConfigDatabase => "config database",
            Self::Default => "default",
        }
    }
}

/// One setting as `whist config` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective {
    pub key: String,
    pub origin: Origin,
    /// The value as given (secrets redacted, passwords cut out of URLs), or the default; `(unset)` for an optional
    /// key that has none.
    pub value: String,
}

/// Whether a key's value must never be shown.
fn is_secret(key: &str) -> bool {
    ["SECRET", "PASSWORD", "TOKEN_KEYS", "HIREFIRE_TOKEN"]
        .iter()
        .any(|part| key.contains(part))
}

impl Sources {
    /// Values from `environment`, then `config_database`.
    pub fn new(
        environment: HashMap<String, String>,
        config_database: HashMap<String, String>,
    ) -> Self {
        Self {
            environment,
            config_database,
            ..Self::default()
        }
    }

    /// The process environment alone.
    pub fn from_process_environment() -> Self {
        Self {
            environment: std::env::vars().collect(),
            ..Self::default()
        }
    }

    /// Every key the settings read from these sources, in name order, with where its value came from: what
    /// `whist config` prints. Call it after [`Settings::from_sources`].
    pub fn report(&self) -> Vec<Effective> {
        let read = self
            .read
            .lock()
            .map(|read| read.clone())
            .unwrap_or_default();
        read.into_iter()
            .map(|(key, default)| {
                let given = |map: &HashMap<String, String>| {
                    map.get(&key).filter(|value| !value.is_empty()).cloned()
                };
                let (origin, value) = match (given(&self.environment), given(&self.config_database))
                {
                    (Some(value), _) => (Origin::Environment, value),
                    (None, Some(value)) => (Origin::ConfigDatabase, value),
                    (None, None) => (
                        Origin::Default,
                        default.unwrap_or_else(|| "(unset)".to_string()),
                    ),
                };
                let value = if origin == Origin::Default {
                    value
                } else if is_secret(&key) {
                    "[redacted]".to_string()
                } else {
                    crate::store::redact_url(&value)
                };
                Effective { key, origin, value }
            })
            .collect()
    }

    fn note_read(&self, key: &str, default: Option<String>) {
        if let Ok(mut read) = self.read.lock() {
            let entry = read.entry(key.to_string()).or_insert(None);
            if entry.is_none() {
                *entry = default;
            }
        }
    }

    /// Adds the rows of the config database named by `CONFIG_DB_URL`, if it is set.
    ///
    /// # Errors
    /// The config database cannot be reached or its stage table read.
    pub async fn with_config_database(mut self) -> Result<Self, ConfigError> {
        let Some(url) = self.raw("CONFIG_DB_URL") else {
            return Ok(self);
        };
        let environment = parse_environment(self.environment.get("ENVIRONMENT"))?;
        let table = environment.config_table();
        let read = async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect(&url)
                .await?;
            let rows: Vec<(String, String)> =
                sqlx::query_as(&format!("SELECT key, value FROM \"{table}\""))
                    .fetch_all(&pool)
                    .await?;
            pool.close().await;
            Ok::<_, sqlx::Error>(rows)
        };
        let rows = read
            .await
            .map_err(|source| ConfigError::ConfigDatabase { table, source })?;
        self.config_database = rows.into_iter().collect();
        Ok(self)
    }

    fn raw(&self, key: &str) -> Option<String> {
        self.note_read(key, None);
        self.environment
            .get(key)
            .or_else(|| self.config_database.get(key))
            .filter(|value| !value.is_empty())
            .cloned()
    }

    fn parse<T: fmt::Debug>(
        &self,
        key: &str,
        default: T,
        expected: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        self.note_read(key, Some(format!("{default:?}")));
        match self.raw(key) {
            None => Ok(default),
            Some(value) => parse(value.trim()).ok_or_else(|| ConfigError::Malformed {
                key: key.to_string(),
                expected,
            }),
        }
    }
}

/// The stage, from `ENVIRONMENT`. Unset means `local` only while nothing production-shaped is configured: a Postgres
/// `DATABASE_URL`, `WHIST_CLOUD=aws`, `AUTH0_DOMAIN` or `AUTH0_JWKS_URL`. Otherwise start-up fails naming
/// `ENVIRONMENT`, so that a production deployment that forgot it never accepts development tokens.
fn resolve_environment(sources: &Sources) -> Result<Environment, ConfigError> {
    if let Some(value) = sources.raw("ENVIRONMENT") {
        return parse_environment(Some(&value));
    }
    let production_shaped = sources.raw("DATABASE_URL").is_some()
        || sources
            .raw("WHIST_CLOUD")
            .is_some_and(|cloud| cloud.trim() == "aws")
        || sources.raw("AUTH0_DOMAIN").is_some()
        || sources.raw("AUTH0_JWKS_URL").is_some();
    if production_shaped {
        return Err(ConfigError::Missing {
            key: "ENVIRONMENT",
            why: "a production-shaped setting (DATABASE_URL, WHIST_CLOUD=aws, AUTH0_DOMAIN or AUTH0_JWKS_URL) is \
                  configured; set ENVIRONMENT to local, dev, staging or prod",
        });
    }
    Ok(Environment::Local)
}

fn parse_environment(value: Option<&String>) -> Result<Environment, ConfigError> {
    match value.map(|value| value.trim()) {
        None | Some("") | Some("local") => Ok(Environment::Local),
        Some("dev") => Ok(Environment::Dev),
        Some("staging") => Ok(Environment::Staging),
        Some("prod") => Ok(Environment::Prod),
        Some(_) => Err(ConfigError::Malformed {
            key: "ENVIRONMENT".to_string(),
            expected: "one of local, dev, staging, prod",
        }),
    }
}

/// `us-east-1` becomes `US_EAST_1`, the suffix of per-region keys.
pub fn region_key_suffix(region: &str) -> String {
    region.replace('-', "_").to_ascii_uppercase()
}

impl Settings {
    /// Reads every setting from the process environment and the config database.
    ///
    /// # Errors
    /// A key is malformed, or the config database cannot be read.
    pub async fn load() -> Result<Self, ConfigError> {
        let sources = Sources::from_process_environment()
            .with_config_database()
            .await?;
        Self::from_sources(&sources)
    }

    /// Reads every setting from the given sources.
    ///
    /// # Errors
    /// A key is malformed.
    pub fn from_sources(sources: &Sources) -> Result<Self, ConfigError> {
        let environment = resolve_environment(sources)?;
        let port = sources.parse("PORT", 7730u16, "a port number (1-65535)", |value| {
            value.parse::<u16>().ok().filter(|port| *port > 0)
        })?;
        let cloud =
            sources.parse(
                "WHIST_CLOUD",
                CloudKind::Local,
                "aws or local",
                |value| match value {
                    "aws" => Some(CloudKind::Aws),
                    "local" => Some(CloudKind::Local),
                    _ => None,
                },
            )?;
        let database_url = sources.parse(
            "DATABASE_URL",
            None,
            "a postgres:// or postgresql:// URL",
            |value| {
                (value.starts_with("postgres://") || value.starts_with("postgresql://"))
                    .then(|| Some(Secret::new(value)))
            },
        )?;
        let domain = sources.raw("AUTH0_DOMAIN");
        let auth0 = Auth0Settings {
            audience: sources.raw("AUTH0_AUDIENCE"),
            jwks_url: sources.raw("AUTH0_JWKS_URL").or_else(|| {
                domain
                    .as_ref()
                    .map(|domain| format!("https://{domain}/.well-known/jwks.json"))
            }),
            issuer: sources
                .raw("AUTH0_ISSUER")
                .or_else(|| domain.as_ref().map(|domain| format!("https://{domain}/"))),
            ca: sources.parse(
                "AUTH0_CA_PEM",
                None,
                "PEM text of one or more CA certificates (-----BEGIN CERTIFICATE----- blocks)",
                |value| crate::tls::certificates_from_pem(value).ok().map(Some),
            )?,
        };
        let stripe = StripeSettings {
            secret: sources.raw("STRIPE_SECRET").map(Secret::new),
            webhook_secret: sources.raw("STRIPE_WEBHOOK_SECRET").map(Secret::new),
            price_id: sources.raw("STRIPE_PRICE_ID"),
            api_base: sources.parse(
                "STRIPE_API_BASE",
                "https://api.stripe.com".to_string(),
                "an http:// or https:// URL",
                parse_url,
            )?,
            trial_days: sources.parse(
                "STRIPE_TRIAL_DAYS",
                7u32,
                "a whole number of days",
                |value| value.parse().ok(),
            )?,
            return_url: sources.parse(
                "PAYMENT_RETURN_URL",
                "https://whist.com/".to_string(),
                "an http:// or https:// URL",
                parse_url,
            )?,
        };
        let aws = AwsSettings {
            endpoint_url: match sources.raw("AWS_ENDPOINT_URL") {
                Some(_) => Some(sources.parse(
                    "AWS_ENDPOINT_URL",
                    String::new(),
                    "an http:// or https:// URL",
                    parse_url,
                )?),
                None => None,
            },
            static_credentials: sources
                .raw("AWS_ACCESS_KEY_ID")
                .zip(sources.raw("AWS_SECRET_ACCESS_KEY").map(Secret::new)),
            deployment: match (sources.raw("WHIST_DEPLOYMENT"), cloud) {
                (Some(_), _) => sources.parse(
                    "WHIST_DEPLOYMENT",
                    String::new(),
                    "a tag value of letters, digits, '.', '_' and '-' (at most 64)",
                    |value| is_deployment_tag(value).then(|| value.to_string()),
                )?,
                (None, CloudKind::Aws) => return Err(ConfigError::Missing {
                    key: "WHIST_DEPLOYMENT",
                    why: "WHIST_CLOUD=aws needs the tag that marks this deployment's EC2 instances",
                }),
                (None, CloudKind::Local) => "local".to_string(),
            },
        };
        let enabled_regions = sources.parse(
            "ENABLED_REGIONS",
            vec!["us-east-1".to_string()],
            "a JSON list of region names, for example [\"us-east-1\"]",
            |value| {
                serde_json::from_str::<Vec<String>>(value)
                    .ok()
                    .filter(|regions| regions.iter().all(|region| is_region_name(region)))
            },
        )?;
        let desired_free_mandelboxes = sources.parse(
            "DESIRED_FREE_MANDELBOXES",
            2u32,
            "a whole number",
            |value| value.parse().ok(),
        )?;
        let mut desired_free_mandelboxes_by_region = HashMap::new();
        for region in &enabled_regions {
            let key = format!("DESIRED_FREE_MANDELBOXES_{}", region_key_suffix(region));
            if let Some(count) = sources.parse(&key, None, "a whole number", |value| {
                value.parse().ok().map(Some)
            })? {
                desired_free_mandelboxes_by_region.insert(region.clone(), count);
            }
        }
        // HTTPS everywhere by default: simulated hosts serve self-signed certificates they register, as real ones.
        let host_service_scheme = sources.parse(
            "HOST_SERVICE_SCHEME",
            "https".to_string(),
            "http or https",
            |value| matches!(value, "http" | "https").then(|| value.to_string()),
        )?;
        let host_service_ca = sources.parse(
            "HOST_SERVICE_CA_PEM",
            None,
            "PEM text of one or more CA certificates (-----BEGIN CERTIFICATE----- blocks)",
            |value| crate::tls::certificates_from_pem(value).ok().map(Some),
        )?;
        if host_service_ca.is_some() && cloud == CloudKind::Local {
            return Err(ConfigError::Missing {
                key: "WHIST_CLOUD",
                why: "HOST_SERVICE_CA_PEM names a CA for real host services (WHIST_CLOUD=aws): simulated hosts \
                      cannot be issued certificates by it; leave it unset to pin their self-signed certificates",
            });
        }
        let public_url = sources.parse(
            "PUBLIC_URL",
            format!("http://127.0.0.1:{port}"),
            "an http:// or https:// URL",
            parse_url,
        )?;
        let database_direct_url = sources.parse(
            "DATABASE_DIRECT_URL",
            None,
            "a postgres:// or postgresql:// URL",
            |value| {
                (value.starts_with("postgres://") || value.starts_with("postgresql://"))
                    .then(|| Some(Secret::new(value)))
            },
        )?;
        if database_direct_url.is_some() && database_url.is_none() {
            return Err(ConfigError::Missing {
                key: "DATABASE_URL",
                why: "DATABASE_DIRECT_URL is the direct side of a Postgres DATABASE_URL that goes through a pooler",
            });
        }
        let tls_unverified =
            sources.parse("DATABASE_TLS_UNVERIFIED", false, "true or false", |value| {
                value.parse().ok()
            })?;
        if environment != Environment::Local && !tls_unverified {
            for (key, url) in [
                ("DATABASE_URL", &database_url),
                ("DATABASE_DIRECT_URL", &database_direct_url),
            ] {
                if url.as_ref().is_some_and(|url| !verifies_tls(url.expose())) {
                    return Err(ConfigError::Malformed {
                        key: key.to_string(),
                        expected: "outside ENVIRONMENT=local, a Postgres server off this machine is reached with \
                                   sslmode=verify-full (and sslrootcert=<its CA>), so that nobody between can read \
                                   or answer for it; set DATABASE_TLS_UNVERIFIED=true for a provider whose \
                                   certificate cannot be verified",
                    });
                }
            }
        }
        Ok(Self {
            database_url,
            database_direct_url,
            database_pool_size: sources.parse(
                "WHIST_DB_POOL_SIZE",
                20u32,
                "a whole number of connections, at least 2",
                |value| value.parse().ok().filter(|size| *size >= 2),
            )?,
            database_session_limits: crate::store::SessionLimits {
                statement_timeout: seconds_or_off(sources, "WHIST_DB_STATEMENT_TIMEOUT_S", 60)?,
                lock_timeout: seconds_or_off(sources, "WHIST_DB_LOCK_TIMEOUT_S", 10)?,
                idle_in_transaction_timeout: seconds_or_off(
                    sources,
                    "WHIST_DB_IDLE_IN_TRANSACTION_TIMEOUT_S",
                    30,
                )?,
            },
            data_dir: PathBuf::from(
                sources
                    .raw("WHIST_DATA_DIR")
                    .unwrap_or_else(|| "whist-data".to_string()),
            ),
            environment,
            port,
            cloud,
            auth0,
            stripe,
            aws,
            enabled_regions,
            desired_free_mandelboxes,
            desired_free_mandelboxes_by_region,
            mandelbox_limit_per_user: sources.parse(
                "MANDELBOX_LIMIT_PER_USER",
                3u32,
                "a whole number",
                |value| value.parse().ok(),
            )?,
            instance_type: sources.parse(
                "AWS_INSTANCE_TYPE_TO_LAUNCH",
                "g4dn.2xlarge".to_string(),
                "an EC2 instance type such as g4dn.2xlarge",
                |value| {
                    (value.contains('.') && !value.contains(char::is_whitespace))
                        .then(|| value.to_string())
                },
            )?,
            host_service_port: sources.parse(
                "HOST_SERVICE_PORT",
                4678u16,
                "a port number (1-65535)",
                |value| value.parse::<u16>().ok().filter(|port| *port > 0),
            )?,
            host_service_scheme,
            host_service_ca,
            public_url,
            heartbeat_timeout: Duration::from_secs(sources.parse(
                "HEARTBEAT_TIMEOUT_S",
                120u64,
                "a whole number of seconds, at least 1",
                |value| value.parse().ok().filter(|seconds| *seconds > 0),
            )?),
            stale_allocation_timeout: Duration::from_secs(sources.parse(
                "WHIST_STALE_ALLOCATION_S",
                90u64,
                "a whole number of seconds, at least 1",
                |value| value.parse().ok().filter(|seconds| *seconds > 0),
            )?),
            assign_rate_limit_per_minute: sources.parse(
                "ASSIGN_RATE_LIMIT_PER_MINUTE",
                10u32,
                "a whole number (0 turns the limit off)",
                |value| value.parse().ok(),
            )?,
            assign_rate_limit_per_ip_per_minute: sources.parse(
                "ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE",
                600u32,
                "a whole number (0 turns the limit off)",
                |value| value.parse().ok(),
            )?,
            assign_concurrency: sources.parse(
                "WHIST_ASSIGN_CONCURRENCY",
                64u32,
                "a whole number, at least 1",
                |value| value.parse().ok().filter(|bound| *bound > 0),
            )?,
            assign_queue: milliseconds(
                sources,
                "WHIST_ASSIGN_QUEUE_MS",
                100,
                "a whole number of milliseconds (0 answers 429 at once)",
            )?,
            hirefire_token: sources.raw("HIREFIRE_TOKEN").map(Secret::new),
            fleet: FleetSettings::from_sources(sources)?,
            token_keys: match sources.raw("WHIST_TOKEN_KEYS") {
                Some(_) => sources.parse(
                    "WHIST_TOKEN_KEYS",
                    Vec::new(),
                    "comma-separated id:base64 entries, each key at least 32 bytes, ids unique",
                    parse_token_keys,
                )?,
                None if environment == Environment::Local => Vec::new(),
                None => {
                    return Err(ConfigError::Missing {
                        key: "WHIST_TOKEN_KEYS",
                        why: "outside ENVIRONMENT=local the keys that derive host, bootstrap and protocol tokens \
                              must come from the environment (id:base64 entries, the first one signing)",
                    })
                }
            },
            trusted_proxies: sources.parse(
                "TRUSTED_PROXIES",
                Vec::new(),
                "a JSON list of CIDRs, for example [\"10.0.0.0/8\"]",
                parse_cidrs,
            )?,
            host_network_cidrs: sources.parse(
                "HOST_NETWORK_CIDRS",
                default_host_networks(cloud),
                "a JSON list of CIDRs, for example [\"10.0.0.0/8\"]",
                parse_cidrs,
            )?,
            max_mandelbox_capacity: sources.parse(
                "MAX_MANDELBOX_CAPACITY",
                64u32,
                "a whole number, at least 1",
                |value| value.parse().ok().filter(|capacity| *capacity > 0),
            )?,
            jwks_cache_ttl: seconds(sources, "JWKS_CACHE_TTL_S", 600)?,
            sweep_max_silent_fraction: sources.parse(
                "SWEEP_MAX_SILENT_FRACTION",
                0.5f64,
                "a fraction between 0 and 1",
                |value| {
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|fraction| (0.0..=1.0).contains(fraction))
                },
            )?,
            http_header_timeout: seconds(sources, "WHIST_HTTP_HEADER_TIMEOUT_S", 15)?,
            fault_panic_loop: sources.raw("WHIST_FAULT_PANIC_LOOP"),
            auto_migrate: sources.parse("WHIST_AUTO_MIGRATE", true, "true or false", |value| {
                value.parse().ok()
            })?,
            shutdown_grace: seconds(sources, "SHUTDOWN_GRACE_S", 20)?,
        })
    }

    /// How host services are authenticated: plain HTTP, pinned fingerprints, or the host-service CA.
    pub fn host_trust(&self) -> crate::host_client::HostTrust {
        use crate::host_client::HostTrust;
        match (self.host_service_scheme.as_str(), &self.host_service_ca) {
            ("http", _) => HostTrust::Plain,
            (_, Some(authorities)) => HostTrust::Authority(authorities.clone()),
            (_, None) => HostTrust::Pinned,
        }
    }

    /// Whether a registering host must declare its certificate's fingerprint: over HTTPS without a CA, it is all
    /// that authenticates the host service on later calls.
    pub fn host_tls_pin_required(&self) -> bool {
        self.host_trust() == crate::host_client::HostTrust::Pinned
    }

    /// How simulated hosts (`WHIST_CLOUD=local`) serve: as the webserver will call them.
    pub fn simulated_host_tls(&self) -> crate::simulated_host::HostTls {
        match self.host_service_scheme.as_str() {
            "http" => crate::simulated_host::HostTls::Plain,
            _ => crate::simulated_host::HostTls::SelfSigned,
        }
    }

    /// The warm buffer wanted in `region`.
    pub fn desired_free_mandelboxes_in(&self, region: &str) -> u32 {
        self.desired_free_mandelboxes_by_region
            .get(region)
            .copied()
            .unwrap_or(self.desired_free_mandelboxes)
    }
}

fn seconds(sources: &Sources, key: &str, default: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(sources.parse(
        key,
        default,
        "a whole number of seconds, at least 1",
        |value| value.parse().ok().filter(|seconds| *seconds > 0),
    )?))
}

/// A duration in whole milliseconds, 0 included; `what` says what a valid value is, in the error for one that is not.
fn milliseconds(
    sources: &Sources,
    key: &str,
    default: u64,
    what: &'static str,
) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(sources.parse(
        key,
        default,
        what,
        |value| value.parse().ok(),
    )?))
}

/// A limit in whole seconds, where 0 turns it off.
fn seconds_or_off(sources: &Sources, key: &str, default: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(sources.parse(
        key,
        default,
        "a whole number of seconds (0: no limit)",
        |value| value.parse().ok(),
    )?))
}

impl FleetSettings {
    fn from_sources(sources: &Sources) -> Result<Self, ConfigError> {
        Ok(Self {
            autoscale: sources.parse("WHIST_AUTOSCALE", true, "true or false", |value| {
                value.parse().ok()
            })?,
            host_capacity: sources.parse(
                "WHIST_HOST_CAPACITY",
                4u32,
                "a whole number, at least 1",
                |value| value.parse().ok().filter(|capacity| *capacity > 0),
            )?,
            registration_timeout: seconds(sources, "WHIST_REGISTRATION_TIMEOUT_S", 900)?,
            drained_host_timeout: seconds(sources, "WHIST_DRAINED_HOST_TIMEOUT_S", 120)?,
            repair_interval: seconds(sources, "WHIST_REPAIR_INTERVAL_S", 60)?,
            job_claim: seconds(sources, "WHIST_JOB_CLAIM_S", 60)?,
            fault_pause_after_launch: milliseconds(
                sources,
                "WHIST_FAULT_PAUSE_AFTER_LAUNCH_MS",
                0,
                "a whole number of milliseconds",
            )?,
            leader_lease: Duration::from_secs(sources.parse(
                "WHIST_LEADER_LEASE_S",
                15u64,
                "a whole number of seconds, at least 3",
                |value| value.parse().ok().filter(|seconds| *seconds >= 3),
            )?),
            fault_pause_before_deciding: milliseconds(
                sources,
                "WHIST_FAULT_PAUSE_BEFORE_DECIDING_MS",
                0,
                "a whole number of milliseconds",
            )?,
        })
    }
}

/// Whether a Postgres URL checks whom it talks to: `sslmode=verify-full` or `verify-ca`, or a server on this
/// machine (loopback or a Unix socket), where nothing lies between.
fn verifies_tls(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let mode = parsed
        .query_pairs()
        .find(|(name, _)| name == "sslmode")
        .map(|(_, mode)| mode.into_owned());
    if matches!(mode.as_deref(), Some("verify-full" | "verify-ca")) {
        return true;
    }
    let socket = parsed
        .query_pairs()
        .any(|(name, value)| name == "host" && value.starts_with('/'));
    let host = parsed.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    socket || loopback || host.is_empty()
}

/// `id:base64,id:base64`: ids of letters, digits, `_` and `-` (at most 32, unique), keys of at least
/// [`MIN_TOKEN_KEY_BYTES`] bytes in standard or URL-safe base64.
fn parse_token_keys(value: &str) -> Option<Vec<TokenKey>> {
    use base64::Engine;
    let mut keys: Vec<TokenKey> = Vec::new();
    for entry in value.split(',') {
        let (id, encoded) = entry.trim().split_once(':')?;
        let valid_id = !id.is_empty()
            && id.len() <= 32
            && id.chars().all(|character| {
                character.is_ascii_alphanumeric() || matches!(character, '_' | '-')
            });
        if !valid_id || keys.iter().any(|key| key.id == id) {
            return None;
        }
        let encoded = encoded.trim().trim_end_matches('=');
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(encoded)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded))
            .ok()?;
        if bytes.len() < MIN_TOKEN_KEY_BYTES {
            return None;
        }
        keys.push(TokenKey {
            id: id.to_string(),
            bytes,
        });
    }
    (!keys.is_empty()).then_some(keys)
}

fn parse_cidrs(value: &str) -> Option<Vec<ipnet::IpNet>> {
    serde_json::from_str::<Vec<String>>(value)
        .ok()?
        .iter()
        .map(|cidr| cidr.trim().parse::<ipnet::IpNet>().ok())
        .collect()
}

/// Simulated hosts listen on loopback; EC2 hosts have private addresses.
fn default_host_networks(cloud: CloudKind) -> Vec<ipnet::IpNet> {
    let cidrs: &[&str] = match cloud {
        CloudKind::Local => &["127.0.0.0/8"],
        CloudKind::Aws => &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
    };
    cidrs.iter().filter_map(|cidr| cidr.parse().ok()).collect()
}

fn is_deployment_tag(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value.chars().all(|character| {
            character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-')
        })
}

fn parse_url(value: &str) -> Option<String> {
    (value.starts_with("http://") || value.starts_with("https://"))
        .then(|| value.trim_end_matches('/').to_string())
}

fn is_region_name(region: &str) -> bool {
    !region.is_empty()
        && region.chars().all(|character| {
            character.is_ascii_lowercase() || character.is_ascii_digit() || character == '-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            environment: pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn no_configuration_gives_the_contract_defaults() {
        let settings = Settings::from_sources(&Sources::default()).expect("defaults are valid");
        assert_eq!(settings.port, 7730);
        assert_eq!(settings.environment, Environment::Local);
        assert_eq!(settings.cloud, CloudKind::Local);
        assert_eq!(settings.database_url, None);
        assert_eq!(settings.enabled_regions, vec!["us-east-1".to_string()]);
        assert_eq!(settings.desired_free_mandelboxes_in("us-east-1"), 2);
        assert_eq!(settings.mandelbox_limit_per_user, 3);
        assert_eq!(settings.instance_type, "g4dn.2xlarge");
        assert_eq!(settings.host_service_port, 4678);
        assert_eq!(
            settings.host_service_scheme, "https",
            "simulated hosts serve HTTPS, pinned like real ones"
        );
        assert_eq!(settings.host_service_ca, None);
        assert!(settings.host_tls_pin_required());
        assert_eq!(settings.public_url, "http://127.0.0.1:7730");
        assert_eq!(settings.heartbeat_timeout, Duration::from_secs(120));
        assert_eq!(settings.assign_rate_limit_per_minute, 10);
        assert_eq!(settings.assign_rate_limit_per_ip_per_minute, 600);
        assert_eq!(settings.assign_concurrency, 64);
        assert_eq!(settings.assign_queue, Duration::from_millis(100));
        assert_eq!(settings.stripe.api_base, "https://api.stripe.com");
        assert_eq!(settings.hirefire_token, None);
        assert!(settings.fleet.autoscale);
        assert_eq!(settings.fleet.host_capacity, 4);
        assert_eq!(
            settings.fleet.registration_timeout,
            Duration::from_secs(900)
        );
        assert_eq!(
            settings.fleet.drained_host_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(settings.fleet.fault_pause_after_launch, Duration::ZERO);
        assert_eq!(settings.aws.deployment, "local");
        assert!(settings.token_keys.is_empty(), "local generates its key");
        assert!(settings.trusted_proxies.is_empty());
        assert_eq!(
            settings.host_network_cidrs,
            vec!["127.0.0.0/8".parse::<ipnet::IpNet>().expect("a CIDR")]
        );
        assert_eq!(settings.max_mandelbox_capacity, 64);
        assert_eq!(settings.jwks_cache_ttl, Duration::from_secs(600));
        assert_eq!(settings.sweep_max_silent_fraction, 0.5);
    }

    /// A key of `WHIST_TOKEN_KEYS` (32 bytes of `byte`, base64).
    fn key_entry(id: &str, byte: u8) -> String {
        use base64::Engine;
        format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        )
    }

    #[test]
    fn a_production_shaped_setting_without_environment_stops_start_up_naming_it() {
        for shaped in [
            ("DATABASE_URL", "postgres://127.0.0.1/whist"),
            ("WHIST_CLOUD", "aws"),
            ("AUTH0_DOMAIN", "whist.us.auth0.com"),
            ("AUTH0_JWKS_URL", "http://127.0.0.1:9/jwks.json"),
        ] {
            let error = Settings::from_sources(&sources(&[shaped])).expect_err("refused");
            assert!(
                error.to_string().contains("ENVIRONMENT"),
                "{shaped:?}: {error}"
            );
        }
    }

    #[test]
    fn outside_local_the_token_keys_are_required() {
        let error =
            Settings::from_sources(&sources(&[("ENVIRONMENT", "prod")])).expect_err("refused");
        assert!(error.to_string().contains("WHIST_TOKEN_KEYS"), "{error}");
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "prod"),
            (
                "WHIST_TOKEN_KEYS",
                &format!("{},{}", key_entry("k2", 2), key_entry("k1", 1)),
            ),
        ]))
        .expect("valid");
        let ids: Vec<&str> = settings
            .token_keys
            .iter()
            .map(|key| key.id.as_str())
            .collect();
        assert_eq!(ids, ["k2", "k1"], "the first one signs");
        assert!(
            !format!("{settings:?}").contains("AgICAgIC"),
            "key bytes are redacted"
        );
    }

    #[test]
    fn a_short_or_repeated_token_key_is_malformed() {
        for keys in [
            "k1:c2hvcnQ".to_string(),
            format!("{},{}", key_entry("k1", 1), key_entry("k1", 2)),
            "no-colon".to_string(),
            format!("bad id{}", &key_entry("", 1)),
        ] {
            let error = Settings::from_sources(&sources(&[
                ("ENVIRONMENT", "dev"),
                ("WHIST_TOKEN_KEYS", &keys),
            ]))
            .expect_err("refused");
            assert!(error.to_string().contains("WHIST_TOKEN_KEYS"), "{error}");
        }
    }

    #[test]
    fn ec2_needs_a_deployment_tag() {
        let error = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("WHIST_CLOUD", "aws"),
        ]))
        .expect_err("refused");
        assert!(error.to_string().contains("WHIST_DEPLOYMENT"), "{error}");
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("WHIST_CLOUD", "aws"),
            ("WHIST_DEPLOYMENT", "whist-staging"),
        ]))
        .expect("valid");
        assert_eq!(settings.aws.deployment, "whist-staging");
        assert_eq!(
            settings.host_network_cidrs,
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
                .iter()
                .map(|cidr| cidr.parse::<ipnet::IpNet>().expect("a CIDR"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn network_lists_must_be_json_lists_of_cidrs() {
        for key in ["TRUSTED_PROXIES", "HOST_NETWORK_CIDRS"] {
            let error =
                Settings::from_sources(&sources(&[(key, "10.0.0.0/8")])).expect_err("refused");
            assert!(error.to_string().contains(key), "{error}");
            let error = Settings::from_sources(&sources(&[(key, r#"["10.0.0.0/33"]"#)]))
                .expect_err("refused");
            assert!(error.to_string().contains(key), "{error}");
        }
        let settings = Settings::from_sources(&sources(&[(
            "TRUSTED_PROXIES",
            r#"["10.1.0.0/16","::1/128"]"#,
        )]))
        .expect("valid");
        assert_eq!(settings.trusted_proxies.len(), 2);
    }

    #[test]
    fn real_hosts_are_reached_over_https_by_default() {
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("WHIST_CLOUD", "aws"),
            ("WHIST_DEPLOYMENT", "whist-test"),
        ]))
        .expect("valid");
        assert_eq!(settings.host_service_scheme, "https");
    }

    #[test]
    fn a_malformed_key_stops_start_up_naming_the_key() {
        let error = Settings::from_sources(&sources(&[("PORT", "seventy")])).expect_err("refused");
        assert!(error.to_string().contains("PORT"), "{error}");
        let error = Settings::from_sources(&sources(&[("ENABLED_REGIONS", "us-east-1")]))
            .expect_err("refused");
        assert!(error.to_string().contains("ENABLED_REGIONS"), "{error}");
    }

    #[test]
    fn a_malformed_secret_is_named_but_never_shown() {
        let error = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("DATABASE_URL", "mysql://u:hunter2@h/db"),
        ]))
        .expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("DATABASE_URL"));
        assert!(!message.contains("hunter2"));
    }

    #[test]
    fn outside_local_a_remote_postgres_must_be_reached_with_verified_tls() {
        let keys = "k1:".to_string() + &"A".repeat(44);
        let with = |url: &str, extra: &[(&'static str, &'static str)]| {
            let mut pairs = vec![
                ("ENVIRONMENT", "prod"),
                ("WHIST_TOKEN_KEYS", keys.as_str()),
                ("DATABASE_URL", url),
            ];
            pairs.extend_from_slice(extra);
            Settings::from_sources(&sources(&pairs))
        };
        for weak in [
            "postgres://u@db.internal/whist",
            "postgres://u@db.internal/whist?sslmode=prefer",
            "postgres://u@db.internal/whist?sslmode=require",
        ] {
            let error = with(weak, &[]).expect_err("refused");
            assert!(error.to_string().contains("DATABASE_URL"), "{error}");
            assert!(error.to_string().contains("verify-full"), "{error}");
            with(weak, &[("DATABASE_TLS_UNVERIFIED", "true")]).expect("the provider's exception");
        }
        for verified in [
            "postgres://u@db.internal/whist?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            "postgres://u@db.internal/whist?sslmode=verify-ca",
            "postgres://u@127.0.0.1:5432/whist",
            "postgres://u@localhost/whist",
            "postgres://u@[::1]/whist",
            "postgres:///whist?host=/var/run/postgresql",
        ] {
            with(verified, &[]).unwrap_or_else(|error| panic!("{verified}: {error}"));
        }
        let error = with(
            "postgres://u@127.0.0.1:6432/whist",
            &[("DATABASE_DIRECT_URL", "postgres://u@db.internal/whist")],
        )
        .expect_err("the direct side is checked too");
        assert!(error.to_string().contains("DATABASE_DIRECT_URL"), "{error}");
    }

    #[test]
    fn a_direct_url_without_a_database_url_is_refused() {
        let error = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("DATABASE_DIRECT_URL", "postgres://u@127.0.0.1/whist"),
        ]))
        .expect_err("refused");
        assert!(error.to_string().contains("DATABASE_URL"), "{error}");
    }

    #[test]
    fn a_host_service_ca_must_be_pem_certificates_and_is_for_real_hosts() {
        let authority = crate::tls::Authority::new("host services").expect("a CA");
        let pem = authority.certificate_pem();
        let error =
            Settings::from_sources(&sources(&[("HOST_SERVICE_CA_PEM", "not a certificate")]))
                .expect_err("refused");
        assert!(error.to_string().contains("HOST_SERVICE_CA_PEM"), "{error}");
        let error = Settings::from_sources(&sources(&[("HOST_SERVICE_CA_PEM", pem.as_str())]))
            .expect_err("simulated hosts cannot be issued by it");
        assert!(error.to_string().contains("WHIST_CLOUD"), "{error}");
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("WHIST_CLOUD", "aws"),
            ("WHIST_DEPLOYMENT", "whist-staging"),
            ("HOST_SERVICE_CA_PEM", pem.as_str()),
        ]))
        .expect("valid");
        assert!(!settings.host_tls_pin_required());
        assert!(matches!(
            settings.host_trust(),
            crate::host_client::HostTrust::Authority(authorities) if authorities.len() == 1
        ));
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("STRIPE_SECRET", "sk_test_hunter2"),
            ("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/db"),
        ]))
        .expect("valid");
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn the_environment_wins_over_the_config_database() {
        let mut layered = sources(&[("PORT", "8000")]);
        layered
            .config_database
            .insert("PORT".to_string(), "9000".to_string());
        layered
            .config_database
            .insert("MANDELBOX_LIMIT_PER_USER".to_string(), "5".to_string());
        let settings = Settings::from_sources(&layered).expect("valid");
        assert_eq!(settings.port, 8000);
        assert_eq!(settings.mandelbox_limit_per_user, 5);
    }

    #[test]
    fn a_region_specific_buffer_overrides_the_general_one() {
        let settings = Settings::from_sources(&sources(&[
            ("ENABLED_REGIONS", r#"["us-east-1","eu-west-1"]"#),
            ("DESIRED_FREE_MANDELBOXES", "4"),
            ("DESIRED_FREE_MANDELBOXES_EU_WEST_1", "7"),
        ]))
        .expect("valid");
        assert_eq!(settings.desired_free_mandelboxes_in("us-east-1"), 4);
        assert_eq!(settings.desired_free_mandelboxes_in("eu-west-1"), 7);
    }

    #[test]
    fn auth0_urls_are_derived_from_the_domain_unless_overridden() {
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("AUTH0_DOMAIN", "whist.us.auth0.com"),
        ]))
        .expect("valid");
        assert_eq!(
            settings.auth0.jwks_url.as_deref(),
            Some("https://whist.us.auth0.com/.well-known/jwks.json")
        );
        assert_eq!(
            settings.auth0.issuer.as_deref(),
            Some("https://whist.us.auth0.com/")
        );
        let settings = Settings::from_sources(&sources(&[
            ("ENVIRONMENT", "local"),
            ("AUTH0_DOMAIN", "whist.us.auth0.com"),
            ("AUTH0_JWKS_URL", "http://127.0.0.1:9/jwks.json"),
        ]))
        .expect("valid");
        assert_eq!(
            settings.auth0.jwks_url.as_deref(),
            Some("http://127.0.0.1:9/jwks.json")
        );
    }
}
