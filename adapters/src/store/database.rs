//! Connecting to the event store's database, whichever backend it is, and migrating it.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Any, AnyPool, PgPool, Postgres, SqlitePool};

use cqrs_es::persist::{PersistenceError, SerializedEvent};

use super::append_batcher::AppendBatcher;
use super::follower::LogFollowing;
use super::held::{Held, HeldConnections};
use super::log::{EventLog, JobsSignal, LogSignal, LogWatermark};
use super::reachability::Reachability;
use crate::supervision::BackgroundLoops;

/// How long a request waits for a pooled connection before the store counts as unavailable (503): long enough to
/// ride out a burst on a loaded machine, short enough that an outage answers instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections of the Postgres pool kept between statements.
#[derive(Clone, Debug)]
struct KeptConnections {
    /// The append flusher's one.
    appends: HeldConnections<Postgres>,
    catch_up_reads: HeldConnections<Postgres>,
}

/// Connections of a pool of `max_connections` that a kind of read keeps for itself: a quarter, at most 4, so that
/// the rest of the process (the append flusher keeps one more of the first pool) always finds some in the pool.
fn kept_for_reads(max_connections: u32) -> usize {
    usize::try_from(max_connections / 4).unwrap_or(0).min(4)
}

/// Limits on every session of the store's pools to Postgres, so that one stalled holder cannot freeze everything:
/// a statement that runs too long, a wait for a lock that does not come, a transaction left open by a process that
/// stopped (its locks, a projection's checkpoint, are released when its session is ended). Zero turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `statement_timeout`: no statement of the store's runs long (reads and writes go in batches).
    pub statement_timeout: Duration,
    /// `lock_timeout`: a wait for a row or advisory lock.
    pub lock_timeout: Duration,
    /// `idle_in_transaction_session_timeout`: a session whose transaction waits on its client.
    pub idle_in_transaction_timeout: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            statement_timeout: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(30),
        }
    }
}

impl SessionLimits {
    /// No limits: for bulk loads that are meant to run long (the benchmarks' synthetic logs).
    pub fn none() -> Self {
        Self {
            statement_timeout: Duration::ZERO,
            lock_timeout: Duration::ZERO,
            idle_in_transaction_timeout: Duration::ZERO,
        }
    }

    /// The statement that applies the limits to a session (one round trip, when the session opens), and its
    /// parameters: milliseconds, as Postgres reads them.
    const APPLY: &'static str = "SELECT set_config('statement_timeout', $1, false), \
         set_config('lock_timeout', $2, false), set_config('idle_in_transaction_session_timeout', $3, false)";

    /// The statement that applies the limits, with its parameters bound, for either driver.
    fn apply<'q, DB: sqlx::Database>(
        self,
    ) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
    where
        String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        let [statement, lock, idle] = [
            self.statement_timeout,
            self.lock_timeout,
            self.idle_in_transaction_timeout,
        ]
        .map(|limit| limit.as_millis().to_string());
        sqlx::query(Self::APPLY)
            .bind(statement)
            .bind(lock)
            .bind(idle)
    }
}

/// How the store's pools are made: their size, and the limits on each session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections per pool (a process keeps two to Postgres).
    pub max_connections: u32,
    pub limits: SessionLimits,
}

impl PoolSettings {
    /// Pools of `max_connections` with the default limits.
    pub fn sized(max_connections: u32) -> Self {
        Self {
            max_connections,
            limits: SessionLimits::default(),
        }
    }
}

/// The concrete pool behind the event store.
#[derive(Clone, Debug)]
pub enum Backend {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Failures to reach or prepare the database.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("could not connect to the event store at {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not create the embedded store's folder {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not apply the migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error")]
    Sql(#[from] sqlx::Error),
    /// The schema is behind this binary and this process may not migrate it (`WHIST_AUTO_MIGRATE=false`).
    #[error(
        "the store's schema lacks {pending} migration(s) this binary needs, the first {first}; run `whist migrate` (the release step) first"
    )]
    SchemaBehind { pending: usize, first: String },
}

/// The event store database: the backend pool (for cqrs-es and backend-specific statements), a pool of the
/// `Any` driver (for read models and checkpoints, whose SQL is written once for both backends), and the signal
/// that wakes readers of the log.
#[derive(Clone, Debug)]
pub struct Database {
    backend: Backend,
    /// A session-mode pool to the same Postgres (`DATABASE_DIRECT_URL`), for what needs a session of its own:
    /// `LISTEN` and the migrations' lock. `None`: the main pool's server is direct.
    direct: Option<PgPool>,
    /// Group commit of units on Postgres (`None` on SQLite, which writes one transaction at a time anyway).
    batcher: Option<AppendBatcher>,
    /// Connections kept between statements (Postgres; see [`HeldConnections`]): the append flusher's, and the
    /// catch-up reads' of remembered copies.
    kept: Option<KeptConnections>,
    any: AnyPool,
    /// Connections of the `Any` pool kept between the read models' reads on every request (`Database::hot_read`);
    /// none on SQLite, whose pool has no test round trip to save.
    hot_reads: HeldConnections<Any>,
    signal: LogSignal,
    /// Raised when jobs were planned (see [`JobsSignal`]).
    jobs: JobsSignal,
    /// The highest position this process has seen, and the stretch of the log it read last, shared by its readers.
    watermark: LogWatermark,
    /// The log follower's standing (how current the remembered copies are) and the stores' markers.
    following: LogFollowing,
    /// Stops the log follower when the last handle of the store is dropped. Its reads that reach the head are
    /// also this process's head watch: a process that neither appends nor projects (`serve --api-only` between
    /// requests) still notices a log that moved back within `IDLE_READ` (100 ms).
    _follower: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    description: String,
    reachability: Reachability,
    /// The supervised background loops of the process that opened this store: the append batcher's flushers from
    /// the start, and whatever the process runs over the store later (projections, reconciler, …).
    background_loops: BackgroundLoops,
}

impl Database {
    /// Connects to Postgres when `database_url` is given, else to the embedded SQLite store in `data_dir`.
    ///
    /// # Errors
    /// The database cannot be reached, or the embedded store's folder cannot be created.
    pub async fn connect(
        database_url: Option<&str>,
        data_dir: &Path,
        pools: PoolSettings,
    ) -> Result<Self, DatabaseError> {
        sqlx::any::install_default_drivers();
        match database_url {
            Some(url) => Self::connect_postgres(url, pools).await,
            None => Self::connect_sqlite(data_dir).await,
        }
    }

    /// As [`Database::connect`] for Postgres behind a transaction-mode pooler: `database_url` goes through the
    /// pooler, `direct_url` (`DATABASE_DIRECT_URL`) straight to the server, for `LISTEN` and migrations (at most two
    /// connections, opened when first needed).
    ///
    /// # Errors
    /// As `connect`, or `direct_url` is malformed.
    pub async fn connect_split(
        database_url: &str,
        direct_url: &str,
        pools: PoolSettings,
    ) -> Result<Self, DatabaseError> {
        sqlx::any::install_default_drivers();
        let options =
            PgConnectOptions::from_str(direct_url).map_err(|source| DatabaseError::Connect {
                url: redact_url(direct_url),
                source,
            })?;
        let direct = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        let mut database = Self::connect_postgres(database_url, pools).await?;
        database.direct = Some(direct);
        database.description = format!(
            "{} (direct: {})",
            database.description,
            redact_url(direct_url)
        );
        Ok(database)
    }

    /// The pool for a session of its own (`LISTEN`, the migrations' lock): the direct one when there is one.
    pub fn session_pool(&self) -> Option<&PgPool> {
        match (&self.direct, &self.backend) {
            (Some(direct), _) => Some(direct),
            (None, Backend::Postgres(pool)) => Some(pool),
            (None, Backend::Sqlite(_)) => None,
        }
    }

    async fn connect_postgres(url: &str, pools: PoolSettings) -> Result<Self, DatabaseError> {
        let connect_error = |source| DatabaseError::Connect {
            url: redact_url(url),
            source,
        };
        let options = PgConnectOptions::from_str(url).map_err(connect_error)?;
        // No ping before each acquire: it is a round trip per statement, and a dead connection fails the
        // statement anyway, which callers already treat as a store failure. The limits are set once per session
        // (not as startup parameters, which a pooler may refuse).
        let reachability = Reachability::probing(options.clone());
        let limits = pools.limits;
        let pool = PgPoolOptions::new()
            .max_connections(pools.max_connections)
            .test_before_acquire(false)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                Box::pin(async move { limits.apply().execute(connection).await.map(|_| ()) })
            })
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        let any = AnyPoolOptions::new()
            .max_connections(pools.max_connections)
            .test_before_acquire(false)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                Box::pin(async move { limits.apply().execute(connection).await.map(|_| ()) })
            })
            .connect(url)
            .await
            .map_err(connect_error)?;
        let background_loops = BackgroundLoops::new();
        let watermark = LogWatermark::default();
        let kept = KeptConnections {
            appends: HeldConnections::new(pool.clone(), 1),
            catch_up_reads: HeldConnections::new(
                pool.clone(),
                kept_for_reads(pools.max_connections),
            ),
        };
        let hot_reads = HeldConnections::new(any.clone(), kept_for_reads(pools.max_connections));
        let signal = LogSignal::new();
        let following = LogFollowing::default();
        let follower = following.start(&any, &signal, &watermark, &background_loops);
        Ok(Self {
            following,
            _follower: follower,
            batcher: Some(AppendBatcher::start(
                kept.appends.clone(),
                watermark.clone(),
                &background_loops,
            )),
            kept: Some(kept),
            direct: None,
            backend: Backend::Postgres(pool),
            any,
            hot_reads,
            signal,
            jobs: JobsSignal::new(),
            watermark,
            description: redact_url(url),
            reachability,
            background_loops,
        })
    }

    async fn connect_sqlite(data_dir: &Path) -> Result<Self, DatabaseError> {
        std::fs::create_dir_all(data_dir).map_err(|source| DatabaseError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let file = data_dir.join("whist.db");
        let url = format!("sqlite://{}?mode=rwc", file.display());
        let connect_error = |source| DatabaseError::Connect {
            url: url.clone(),
            source,
        };
        let options = SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        let any = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|connection, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 10000")
                        .execute(&mut *connection)
                        .await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(connect_error)?;
        let (signal, watermark, background_loops) = (
            LogSignal::new(),
            LogWatermark::default(),
            BackgroundLoops::new(),
        );
        let following = LogFollowing::default();
        let follower = following.start(&any, &signal, &watermark, &background_loops);
        Ok(Self {
            batcher: None,
            kept: None,
            direct: None,
            backend: Backend::Sqlite(pool),
            hot_reads: HeldConnections::new(any.clone(), 0),
            any,
            signal,
            jobs: JobsSignal::new(),
            watermark,
            following,
            _follower: follower,
            description: url,
            reachability: Reachability::embedded(),
            background_loops,
        })
    }

    /// Applies `migrations/` for this backend. Safe to run from several processes at once (sqlx takes a lock).
    ///
    /// # Errors
    /// A migration failed or the recorded migrations differ from the shipped ones.
    pub async fn migrate(&self) -> Result<(), DatabaseError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                // The lock sqlx takes is a session's: through the direct pool when there is one.
                let session = self.direct.as_ref().unwrap_or(pool);
                sqlx::migrate!("../migrations/postgres")
                    .run(session)
                    .await?
            }
            Backend::Sqlite(pool) => sqlx::migrate!("../migrations/sqlite").run(pool).await?,
        }
        self.start_following().await;
        Ok(())
    }

    /// Starts the log follower from the head, unless it has started: before the process remembers any copy, so
    /// that it has none to forget (the follower does it by itself otherwise, forgetting what was remembered).
    async fn start_following(&self) {
        if let Err(error) = self
            .following
            .start_from_head(&self.any, &self.watermark)
            .await
        {
            tracing::debug!(error = %error, "the log follower could not start yet");
        }
    }

    /// The migrations this binary ships that the store has not applied, oldest first (`version_description`).
    ///
    /// # Errors
    /// The database failed.
    pub async fn pending_migrations(&self) -> Result<Vec<String>, DatabaseError> {
        let (migrator, exists) = match &self.backend {
            Backend::Postgres(_) => (
                sqlx::migrate!("../migrations/postgres"),
                "SELECT CAST(count(*) AS BIGINT) FROM pg_catalog.pg_tables \
                 WHERE tablename = '_sqlx_migrations' AND schemaname = current_schema()",
            ),
            Backend::Sqlite(_) => (
                sqlx::migrate!("../migrations/sqlite"),
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            ),
        };
        let has_table: i64 = sqlx::query_scalar(exists).fetch_one(&self.any).await?;
        let applied: Vec<i64> = if has_table > 0 {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_all(&self.any)
                .await?
        } else {
            Vec::new()
        };
        Ok(migrator
            .iter()
            .filter(|migration| !applied.contains(&migration.version))
            .map(|migration| format!("{}_{}", migration.version, migration.description))
            .collect())
    }

    /// Refuses a schema behind this binary (for a process that may not migrate it).
    ///
    /// # Errors
    /// `SchemaBehind`, or the database failed.
    pub async fn require_migrated(&self) -> Result<(), DatabaseError> {
        let pending = self.pending_migrations().await?;
        match pending.first() {
            None => {
                self.start_following().await;
                Ok(())
            }
            Some(first) => Err(DatabaseError::SchemaBehind {
                pending: pending.len(),
                first: first.clone(),
            }),
        }
    }

    /// Answers whether the database takes a trivial query (the readiness probe).
    ///
    /// # Errors
    /// The database does not answer.
    pub async fn ping(&self) -> Result<(), DatabaseError> {
        sqlx::query("SELECT 1").execute(&self.any).await?;
        Ok(())
    }

    /// Whether the server is known to be down (see [`Reachability`]); failures should be reported to it.
    pub fn reachability(&self) -> &Reachability {
        &self.reachability
    }

    /// The supervised background loops of this process (see [`BackgroundLoops`]), which readiness reports on.
    pub fn background_loops(&self) -> &BackgroundLoops {
        &self.background_loops
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The pool for SQL written once for both backends (read models, checkpoints, the log).
    pub fn any(&self) -> &AnyPool {
        &self.any
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The signal raised whenever this process commits events, and whenever the log's head moves.
    pub fn signal(&self) -> &LogSignal {
        &self.signal
    }

    /// The signal raised when jobs were planned, by this process or (through `LISTEN`) another.
    pub fn jobs_signal(&self) -> &JobsSignal {
        &self.jobs
    }

    /// A reader of the global log.
    pub fn log(&self) -> EventLog {
        EventLog::new(self.any.clone(), self.watermark.clone())
    }

    /// How current the process's remembered copies are (see `LogFollowing`).
    pub fn following(&self) -> &LogFollowing {
        &self.following
    }

    /// The highest position this process has seen, and what it forgets should the log move back (see
    /// [`LogWatermark`]).
    pub fn watermark(&self) -> &LogWatermark {
        &self.watermark
    }

    /// Appends `events` (of one or several aggregates) all together or not at all.
    ///
    /// # Errors
    /// `OptimisticLockError` when any event's sequence number is taken (then none is stored), else the database
    /// failed and nothing was written.
    pub async fn append_unit(&self, events: Vec<SerializedEvent>) -> Result<(), PersistenceError> {
        match (&self.backend, &self.batcher) {
            (Backend::Postgres(_), Some(batcher)) => batcher.append(events).await,
            // Not reached: `connect_postgres` always starts the batcher.
            (Backend::Postgres(_), None) => Err(PersistenceError::UnknownError(
                "the Postgres store has no append batcher".into(),
            )),
            (Backend::Sqlite(pool), _) => append_sqlite(pool, &events).await,
        }
    }

    /// The connections the catch-up reads of remembered copies keep between reads (`None` on SQLite).
    pub(crate) fn catch_up_reads(&self) -> Option<&HeldConnections<Postgres>> {
        self.kept.as_ref().map(|kept| &kept.catch_up_reads)
    }

    /// A connection of the `Any` pool for a read model's read made on every request (the assign's candidates):
    /// [`Held::keep`] it after a read that succeeded, so that the next such read skips the pool's test round trip.
    /// On SQLite, a connection of the pool as usual.
    ///
    /// # Errors
    /// The pool could not give a connection.
    pub async fn hot_read(&self) -> Result<Held<Any>, sqlx::Error> {
        self.hot_reads.take().await
    }

    /// Where the store lives, with any password removed (for logs).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Closes both pools (after giving back the connections kept between statements).
    pub async fn close(&self) {
        if let Some(kept) = &self.kept {
            kept.appends.give_back();
            kept.catch_up_reads.give_back();
        }
        self.hot_reads.give_back();
        match &self.backend {
            Backend::Postgres(pool) => pool.close().await,
            Backend::Sqlite(pool) => pool.close().await,
        }
        self.any.close().await;
    }
}

/// One transaction: SQLite runs one writer at a time, so there is nothing to gather.
async fn append_sqlite(
    pool: &sqlx::SqlitePool,
    events: &[SerializedEvent],
) -> Result<(), PersistenceError> {
    if events.is_empty() {
        return Ok(());
    }
    let classify = |error: sqlx::Error| match &error {
        sqlx::Error::Database(database_error)
            // A taken primary key or unique key, or an event whose predecessor is not stored (the trigger of
            // migration 0010): the copy this unit was decided on is not the aggregate as stored.
            if matches!(
                database_error.code().as_deref(),
                Some("1555" | "2067" | "1811")
            ) =>
        {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            PersistenceError::ConnectionError(Box::new(error))
        }
        _ => PersistenceError::UnknownError(Box::new(error)),
    };
    let mut transaction = pool.begin().await.map_err(classify)?;
    for event in events {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, \
             metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&event.aggregate_type)
        .bind(&event.aggregate_id)
        .bind(i64::try_from(event.sequence).unwrap_or(i64::MAX))
        .bind(&event.event_type)
        .bind(&event.event_version)
        .bind(event.payload.to_string())
        .bind(event.metadata.to_string())
        .execute(&mut *transaction)
        .await
        .map_err(classify)?;
    }
    transaction.commit().await.map_err(classify)?;
    Ok(())
}

/// Removes the password from a database URL so that it can be logged: the one in the authority
/// (`user:password@host`) and any query parameter that carries one (`?password=`, `sslpassword=`).
pub fn redact_url(url: &str) -> String {
    let (address, query) = match url.split_once('?') {
        Some((address, query)) => (address, Some(query)),
        None => (url, None),
    };
    let address = match address.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((credentials, host)) => match credentials.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => address.to_string(),
            },
            None => address.to_string(),
        },
        None => address.to_string(),
    };
    let Some(query) = query else {
        return address;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|parameter| match parameter.split_once('=') {
            Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                format!("{name}=***")
            }
            _ => parameter.to_string(),
        })
        .collect();
    format!("{address}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_password_never_reaches_the_logs() {
        assert_eq!(
            redact_url("postgres://whist:s3cret@db:5432/whist"),
            "postgres://whist:***@db:5432/whist"
        );
        assert_eq!(
            redact_url("postgres://127.0.0.1/test"),
            "postgres://127.0.0.1/test"
        );
        assert_eq!(
            redact_url("postgres://whist@db/whist?sslmode=require&password=s3cret"),
            "postgres://whist@db/whist?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://db/whist?PASSWORD=s3cret&sslpassword=k3y"),
            "postgres://db/whist?PASSWORD=***&sslpassword=***"
        );
    }
}
