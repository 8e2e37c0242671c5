//! The projection runner: moves every projection from its checkpoint to the log's head, and rebuilds one from
//! position 0 into shadow tables that replace the live ones in a single transaction.
//!
//! Exactly-once effect from at-least-once delivery: a batch's read-model writes and the checkpoint that records
//! them commit in one transaction, so a crash either keeps both or neither. The checkpoint row is locked first in
//! that transaction, so any number of processes can run the same projection without applying a batch twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::{Any, AnyConnection, Row, Transaction};
use tokio::sync::watch;
use whist_adapters::store::{
    lease, list_placeholders, Database, EventLog, LoggedEvent, GATHER_WINDOW,
};

use crate::projection::{Projection, ProjectionError, ShadowRun, Tables};

const STATUS_RUNNING: &str = "running";
const STATUS_FAILED: &str = "failed";

/// Failures of the runner itself.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("no projection is named {0}")]
    UnknownProjection(String),
    #[error("projection {0} plans side effects or seals the log, and is never rebuilt")]
    NotRebuildable(String),
    #[error("the database failed")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

/// One table's comparison in `verify`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableDifference {
    pub table: String,
    /// Rows in the live table.
    pub rows: i64,
    /// Live rows the rebuild did not produce.
    pub only_live: i64,
    /// Rebuilt rows the live table lacks.
    pub only_rebuilt: i64,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub events: u64,
    /// The position both models were compared at.
    pub position: i64,
    pub tables: Vec<TableDifference>,
    pub elapsed: Duration,
}

impl VerifyReport {
    /// Rows that differ, in all tables (0: the live model is what its events say).
    pub fn differences(&self) -> i64 {
        self.tables
            .iter()
            .map(|table| table.only_live + table.only_rebuilt)
            .sum()
    }

    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What one step of a projection did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Events up to `position` were applied; the log's head was at `head` as the step began.
    Applied {
        count: usize,
        position: i64,
        head: i64,
    },
    /// Nothing new after the checkpoint.
    CaughtUp,
    /// The projection is stopped on an event that fails (see its `last_error`); a rebuild restarts it.
    Stopped,
    /// This process's projection waits before an event written by a newer binary (a new event, or a new version
    /// of one, during a rolling deploy): processes of the newer binary apply it; this one tries again later and
    /// fails it for nobody.
    Waiting,
}

/// What one step of several projections together did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Together {
    /// Each projection in `applied` applied its events up to the position beside it, in one transaction (none
    /// when all were at the head); `behind`: the batch ended before the log's head, and another step follows.
    Stepped {
        applied: Vec<(&'static str, i64)>,
        behind: bool,
    },
    /// A projection could not apply its events and nothing was kept: step each alone (`ProjectionRunner::step`).
    Apart,
}

/// A projection's standing, as `GET /admin/projections` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub position: i64,
    pub head: i64,
    pub lag: i64,
    pub status: String,
    pub last_error: Option<String>,
}

/// Progress of a rebuild, reported after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildProgress {
    pub position: i64,
    pub head: i64,
    pub events: u64,
}

/// The outcome of a rebuild.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebuildReport {
    pub events: u64,
    pub position: i64,
    pub elapsed: Duration,
}

impl RebuildReport {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the projections of one process.
#[derive(Clone)]
pub struct ProjectionRunner {
    database: Database,
    projections: Vec<Arc<dyn Projection>>,
    batch_size: i64,
    /// The projections of this process that wait before an event of a newer binary, and why.
    waiting: Arc<std::sync::Mutex<std::collections::HashMap<&'static str, String>>>,
    /// Who this process is among those that run projections (the holder of their step leases).
    holder: Arc<str>,
}

/// How long a process may step a projection without renewing its lease (`leases`, `projection:{name}`): one process
/// steps each projection at a time, so that several processes do not split each other's batches or queue on the
/// checkpoint's row lock; when it stops (or stalls) another takes over within this time. The same term holds for
/// [`PROJECTIONS_LEASE`].
pub const STEP_LEASE: Duration = Duration::from_secs(3);
/// The lease whose holder takes every projection's step lease: only it takes a step lease, and a process that does
/// not hold it gives up those it holds. Projections split between processes each read the log apart and step in
/// their own transactions: two `serve` processes that started together and split the six leases answered 1,823
/// assigns/s at 1.04 ms of machine CPU each, against 1,970-2,070/s at 0.90-0.93 ms in the runs where one process
/// held them all (`whist loadtest --servers 2`, 2026-12-06).
pub const PROJECTIONS_LEASE: &str = "projections";
/// How often the holder renews a step lease.
const STEP_LEASE_RENEWAL: Duration = Duration::from_secs(1);

/// The name of a projection's step lease.
pub fn step_lease(name: &str) -> String {
    format!("projection:{name}")
}

const STATUS_WAITING: &str = "waiting";

/// The step leases of one process's projections: which it holds, and when each is next renewed (or, held by
/// another process, tried again); and whether it holds [`PROJECTIONS_LEASE`], which they follow.
struct StepLeases {
    /// Whether this process holds [`PROJECTIONS_LEASE`], and when it is next renewed (or tried again).
    lead: bool,
    lead_due: tokio::time::Instant,
    leases: Vec<StepLease>,
}

struct StepLease {
    name: &'static str,
    held: bool,
    due: tokio::time::Instant,
}

impl StepLeases {
    fn new(names: &[&'static str]) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            lead: false,
            lead_due: now,
            leases: names
                .iter()
                .map(|name| StepLease {
                    name,
                    held: false,
                    due: now,
                })
                .collect(),
        }
    }

    /// Renews the leases that are due, tries again those that another process held, and returns the projections
    /// this process holds. The step leases follow [`PROJECTIONS_LEASE`]: while this process holds it, it renews and
    /// takes them; while another holds it, this process gives up those it holds, so that its holder takes them at
    /// its next renewal.
    async fn renew(&mut self, database: &Database, holder: &str) -> Vec<&'static str> {
        let now = tokio::time::Instant::now();
        if now >= self.lead_due {
            let outcome = lease::hold(database, PROJECTIONS_LEASE, holder, STEP_LEASE).await;
            if let Err(error) = &outcome {
                tracing::warn!(error = %error, "could not renew the projections' lease");
            }
            self.lead = matches!(outcome, Ok(Some(_)));
            self.lead_due = now + STEP_LEASE_RENEWAL;
        }
        for step_lease_of in &mut self.leases {
            if !self.lead {
                if step_lease_of.held {
                    let _ = lease::release(database, &step_lease(step_lease_of.name), holder).await;
                    step_lease_of.held = false;
                }
                continue;
            }
            if now < step_lease_of.due {
                continue;
            }
            let outcome = lease::hold(
                database,
                &step_lease(step_lease_of.name),
                holder,
                STEP_LEASE,
            )
            .await;
            if let Err(error) = &outcome {
                tracing::warn!(projection = step_lease_of.name, error = %error,
                    "could not renew a projection's step lease");
            }
            step_lease_of.held = matches!(outcome, Ok(Some(_)));
            step_lease_of.due = now + STEP_LEASE_RENEWAL;
        }
        self.leases
            .iter()
            .filter(|lease| lease.held)
            .map(|lease| lease.name)
            .collect()
    }

    /// Gives up every lease this process holds.
    async fn release_all(&self, database: &Database, holder: &str) {
        for held in self.leases.iter().filter(|lease| lease.held) {
            let _ = lease::release(database, &step_lease(held.name), holder).await;
        }
        if self.lead {
            let _ = lease::release(database, PROJECTIONS_LEASE, holder).await;
        }
    }
}

impl ProjectionRunner {
    pub fn new(database: Database, projections: Vec<Arc<dyn Projection>>) -> Self {
        Self {
            database,
            projections,
            batch_size: 2_000,
            waiting: Arc::default(),
            holder: Arc::from(uuid::Uuid::new_v4().to_string()),
        }
    }

    /// Who this process is among the holders of projections' step leases.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Records whether this process's projection `name` waits before an event of a newer binary (`Some(why)`).
    fn set_waiting(&self, name: &'static str, why: Option<String>) {
        let Ok(mut waiting) = self.waiting.lock() else {
            return;
        };
        match why {
            Some(why) => {
                if waiting.insert(name, why.clone()).is_none() {
                    tracing::warn!(projection = name, why = %why,
                        "projection waits before an event a newer binary wrote; that binary's processes apply it");
                }
                metrics::gauge!("whist_projection_waiting", "projection" => name).set(1.0);
            }
            None => {
                if waiting.remove(name).is_some() {
                    metrics::gauge!("whist_projection_waiting", "projection" => name).set(0.0);
                }
            }
        }
    }

    /// Sets how many events one step reads at most.
    pub fn with_batch_size(mut self, batch_size: i64) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn projections(&self) -> &[Arc<dyn Projection>] {
        &self.projections
    }

    fn find(&self, name: &str) -> Result<Arc<dyn Projection>, RunnerError> {
        self.projections
            .iter()
            .find(|projection| projection.name() == name)
            .cloned()
            .ok_or_else(|| RunnerError::UnknownProjection(name.to_string()))
    }

    /// Creates the checkpoint of every projection that has none (at position 0).
    ///
    /// # Errors
    /// The database failed.
    pub async fn register(&self) -> Result<(), RunnerError> {
        for projection in &self.projections {
            sqlx::query(
                "INSERT INTO projection_checkpoints (name, position, status, updated_at) \
                 VALUES ($1, 0, $2, $3) ON CONFLICT (name) DO NOTHING",
            )
            .bind(projection.name())
            .bind(STATUS_RUNNING)
            .bind(Utc::now().timestamp_millis())
            .execute(self.database.any())
            .await?;
        }
        Ok(())
    }

    /// Applies at most one batch to the projection named `name`.
    ///
    /// # Errors
    /// The database failed (nothing was recorded; the step can be retried).
    pub async fn step(&self, name: &str) -> Result<StepOutcome, RunnerError> {
        let projection = self.find(name)?;
        let live = Tables::live(projection.tables());
        let mut transaction = self.database.any().begin().await?;
        let log = self.database.log();
        let reading = log.watermark().reading_head();
        let Some((position, status, head)) = lock_checkpoint(&mut transaction, name).await? else {
            return Err(RunnerError::UnknownProjection(name.to_string()));
        };
        // Should the log have moved back, the process forgets what it read past the head before reading on.
        reading.observe(head);
        // The checkpoint stays locked until this transaction ends: it is ended here on every path, not left to the
        // pool (a dropped transaction's rollback waits for a background task, and meanwhile anything that touches the
        // checkpoint waits too: a `whist projections` command once waited two minutes).
        if status == STATUS_FAILED {
            transaction.rollback().await?;
            return Ok(StepOutcome::Stopped);
        }
        let events = log
            .read_after_in(&mut *transaction, position, self.batch_size, head)
            .await?;
        let Some(last) = events.last() else {
            transaction.rollback().await?;
            // Whatever this process waited before has been applied (by a process of the newer binary).
            self.set_waiting(projection.name(), None);
            return Ok(StepOutcome::CaughtUp);
        };
        let last_position = last.position;
        match projection.apply(&mut transaction, &live, &events).await {
            Ok(()) => {
                save_checkpoints(&mut transaction, &[(name, last_position)]).await?;
                transaction.commit().await?;
                projection.committed(&self.database);
                self.set_waiting(projection.name(), None);
                Ok(StepOutcome::Applied {
                    count: events.len(),
                    position: last_position,
                    head,
                })
            }
            Err(ProjectionError::Database(error)) => Err(RunnerError::Database(error)),
            Err(_) => {
                transaction.rollback().await?;
                self.isolate_failure(projection.as_ref(), &live, &events)
                    .await
            }
        }
    }

    /// Applies at most one batch to each of the projections named `names`, all in one transaction: one lock of
    /// their checkpoints, one read of the log from the earliest of them, each projection's events after its own
    /// checkpoint, one write of the checkpoints, one commit (a step of each alone costs all of that per
    /// projection). A stopped projection is left out. Should any projection fail to apply its events, nothing is
    /// kept and `Together::Apart` says to step each alone (`step`), which keeps every event before the one that
    /// fails and stops or waits there.
    ///
    /// # Errors
    /// The database failed (nothing was recorded; the step can be retried).
    pub async fn step_together(&self, names: &[&'static str]) -> Result<Together, RunnerError> {
        let projections = names
            .iter()
            .map(|name| self.find(name))
            .collect::<Result<Vec<_>, _>>()?;
        if projections.is_empty() {
            return Ok(Together::Stepped {
                applied: Vec::new(),
                behind: false,
            });
        }
        let mut transaction = self.database.any().begin().await?;
        let log = self.database.log();
        let reading = log.watermark().reading_head();
        let (checkpoints, head) = lock_checkpoints(&mut transaction, names).await?;
        reading.observe(head);
        let running: Vec<(&Arc<dyn Projection>, i64)> = projections
            .iter()
            .filter_map(|projection| {
                checkpoints
                    .iter()
                    .find(|(name, _, status)| name == projection.name() && status != STATUS_FAILED)
                    .map(|(_, position, _)| (projection, *position))
            })
            .collect();
        let Some(from) = running.iter().map(|(_, position)| *position).min() else {
            transaction.rollback().await?;
            return Ok(Together::Stepped {
                applied: Vec::new(),
                behind: false,
            });
        };
        let events = log
            .read_after_in(&mut *transaction, from, self.batch_size, head)
            .await?;
        let Some(last) = events.last().map(|event| event.position) else {
            transaction.rollback().await?;
            return Ok(Together::Stepped {
                applied: Vec::new(),
                behind: false,
            });
        };
        let mut applied = Vec::new();
        let mut committed = Vec::new();
        for (projection, position) in &running {
            let after = events.partition_point(|event| event.position <= *position);
            if after == events.len() {
                continue;
            }
            let live = Tables::live(projection.tables());
            match projection
                .apply(&mut transaction, &live, &events[after..])
                .await
            {
                Ok(()) => {
                    applied.push((projection.name(), last));
                    committed.push(*projection);
                }
                Err(ProjectionError::Database(error)) => return Err(RunnerError::Database(error)),
                Err(_) => {
                    transaction.rollback().await?;
                    return Ok(Together::Apart);
                }
            }
        }
        save_checkpoints(&mut transaction, &applied).await?;
        transaction.commit().await?;
        for projection in committed {
            projection.committed(&self.database);
            self.set_waiting(projection.name(), None);
        }
        // Behind when the batch ended before the head the step saw: another step follows at once.
        Ok(Together::Stepped {
            applied,
            behind: last < head,
        })
    }

    /// After a batch failed, applies its events one at a time so that every event before the failing one is kept,
    /// then stops the projection on the failing one with `last_error` set.
    async fn isolate_failure(
        &self,
        projection: &dyn Projection,
        live: &Tables,
        events: &[LoggedEvent],
    ) -> Result<StepOutcome, RunnerError> {
        let name = projection.name();
        for event in events {
            let mut transaction = self.database.any().begin().await?;
            let Some((position, _, _)) = lock_checkpoint(&mut transaction, name).await? else {
                return Err(RunnerError::UnknownProjection(name.to_string()));
            };
            if event.position <= position {
                transaction.rollback().await?;
                continue;
            }
            match projection
                .apply(&mut transaction, live, std::slice::from_ref(event))
                .await
            {
                Ok(()) => {
                    save_checkpoints(&mut transaction, &[(name, event.position)]).await?;
                    transaction.commit().await?;
                    projection.committed(&self.database);
                }
                Err(ProjectionError::Database(error)) => return Err(RunnerError::Database(error)),
                Err(error)
                    if !whist_domain::versions::is_known(
                        &event.event_type,
                        &event.event_version,
                    ) =>
                {
                    transaction.rollback().await?;
                    self.set_waiting(
                        name,
                        Some(format!(
                            "event at position {} is {} {}, which this binary does not know: {error}",
                            event.position, event.event_type, event.event_version
                        )),
                    );
                    return Ok(StepOutcome::Waiting);
                }
                Err(error) => {
                    transaction.rollback().await?;
                    let mut transaction = self.database.any().begin().await?;
                    lock_checkpoint(&mut transaction, name).await?;
                    let message = error.to_string();
                    tracing::error!(projection = name, position = event.position, error = %message,
                        "projection stopped on an event it cannot apply");
                    sqlx::query(
                        "UPDATE projection_checkpoints SET status = $2, last_error = $3, updated_at = $4 \
                         WHERE name = $1",
                    )
                    .bind(name)
                    .bind(STATUS_FAILED)
                    .bind(message)
                    .bind(Utc::now().timestamp_millis())
                    .execute(&mut *transaction)
                    .await?;
                    transaction.commit().await?;
                    return Ok(StepOutcome::Stopped);
                }
            }
        }
        Ok(StepOutcome::CaughtUp)
    }

    /// Steps the projection named `name` until it reaches the head (or stops).
    ///
    /// # Errors
    /// The database failed.
    pub async fn catch_up(&self, name: &str) -> Result<StepOutcome, RunnerError> {
        loop {
            match self.step(name).await? {
                StepOutcome::Applied { .. } => continue,
                outcome => return Ok(outcome),
            }
        }
    }

    /// Runs every projection until `shutdown` turns true, waking on every move of the log's head (and once a
    /// second regardless). Database failures are logged and retried.
    ///
    /// One loop steps every projection whose step lease this process holds, together (`step_together`: one
    /// transaction for all of them per wake, instead of one each). A projection that cannot apply its events is
    /// stepped alone, which stops it on the failing event or makes it wait for a newer binary; one that waits is
    /// stepped alone every 5 seconds until it applies again, and the others carry on together. Should the loop
    /// panic, the panic goes on to the caller: the runner is meant to run under a supervisor that restarts it
    /// whole, each projection from its checkpoint.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let names: Vec<&'static str> = self
            .projections
            .iter()
            .map(|projection| projection.name())
            .collect();
        let mut advanced = self.database.signal().on_advance();
        let mut registered = false;
        let mut leases = StepLeases::new(&names);
        // Projections stepped alone (they wait before a newer binary's event, or could not apply), and when next.
        let mut alone: std::collections::HashMap<&'static str, Instant> = Default::default();
        loop {
            // A dropped sender counts as a request to stop: nobody could ask any more, and `changed()` would
            // answer at once on every pass.
            if whist_adapters::supervision::stopping(&shutdown) {
                // Another process takes over at once rather than when the leases run out.
                leases.release_all(&self.database, &self.holder).await;
                return;
            }
            advanced.borrow_and_update();
            if !registered {
                registered = self.register().await.is_ok();
            }
            let held = leases.renew(&self.database, &self.holder).await;
            let together: Vec<&'static str> = held
                .iter()
                .copied()
                .filter(|name| !alone.contains_key(name))
                .collect();
            let mut pause = Duration::from_secs(1);
            match self.step_together(&together).await {
                Ok(Together::Stepped { applied, behind }) => {
                    for (name, position) in &applied {
                        metrics::gauge!("whist_projection_position", "projection" => *name)
                            .set(*position as f64);
                    }
                    if behind {
                        pause = Duration::ZERO;
                    }
                }
                Ok(Together::Apart) => {
                    for name in together {
                        alone.insert(name, Instant::now());
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "projections' step failed; retrying");
                }
            }
            for name in held {
                let Some(due) = alone.get(name).copied() else {
                    continue;
                };
                if Instant::now() < due {
                    continue;
                }
                match self.step(name).await {
                    Ok(StepOutcome::Applied { position, head, .. }) => {
                        metrics::gauge!("whist_projection_position", "projection" => name)
                            .set(position as f64);
                        alone.remove(name);
                        if position < head {
                            pause = Duration::ZERO;
                        }
                    }
                    Ok(StepOutcome::CaughtUp) => {
                        alone.remove(name);
                    }
                    Ok(StepOutcome::Stopped | StepOutcome::Waiting) => {
                        alone.insert(name, Instant::now() + Duration::from_secs(5));
                    }
                    Err(error) => {
                        tracing::warn!(projection = name, error = %error, "projection step failed; retrying");
                    }
                }
            }
            if pause.is_zero() {
                continue;
            }
            // Caught up with the head the step saw: wait for the head to move and gather what comes in that window
            // into the next step, instead of a step that finds nothing or one event.
            tokio::select! {
                _ = advanced.changed() => tokio::time::sleep(GATHER_WINDOW).await,
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// The standing of every registered projection.
    ///
    /// # Errors
    /// The database failed.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, RunnerError> {
        let head = self.database.log().head().await?;
        let rows = sqlx::query(
            "SELECT name, position, status, last_error FROM projection_checkpoints ORDER BY name",
        )
        .fetch_all(self.database.any())
        .await?;
        let waiting = self
            .waiting
            .lock()
            .map(|waiting| waiting.clone())
            .unwrap_or_default();
        rows.iter()
            .map(|row| {
                let position: i64 = row.try_get("position")?;
                let name: String = row.try_get("name")?;
                let (status, last_error) = match waiting.get(name.as_str()) {
                    Some(why) => (STATUS_WAITING.to_string(), Some(why.clone())),
                    None => (row.try_get("status")?, row.try_get("last_error")?),
                };
                Ok(ProjectionStatus {
                    name,
                    position,
                    head,
                    lag: (head - position).max(0),
                    status,
                    last_error,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(RunnerError::from)
    }

    /// Rebuilds the projection named `name` from position 0 into shadow tables, then, in one transaction that
    /// also holds the checkpoint, catches them up to the head and puts them in place of the live tables. Readers
    /// see the old model until that commit and the whole new one after it. A failed projection restarts here.
    ///
    /// # Errors
    /// The database failed or an event cannot be applied; the live tables are then untouched.
    pub async fn rebuild(
        &self,
        name: &str,
        progress: &(dyn Fn(RebuildProgress) + Send + Sync),
    ) -> Result<RebuildReport, RunnerError> {
        let projection = self.find(name)?;
        if !projection.rebuildable() {
            return Err(RunnerError::NotRebuildable(name.to_string()));
        }
        self.register().await?;
        let started = Instant::now();
        let tables = projection.tables();
        let run = ShadowRun::new();
        let shadow = run.tables(tables);
        // Bulk phase, up to the head as it stands now: no lock is held, the live projection keeps running beside us.
        let head = self.database.log().head().await?;
        let (mut position, mut events_applied) =
            self.fill_shadow(&projection, &run, head, progress).await?;

        // Swap phase: hold the checkpoint so the live runner pauses, apply what arrived meanwhile, swap.
        let mut transaction = self.database.any().begin().await?;
        lock_checkpoint(&mut transaction, name).await?;
        loop {
            let events =
                EventLog::read_after_with(&mut *transaction, position, self.rebuild_batch_size())
                    .await?;
            let Some(last) = events.last() else { break };
            position = last.position;
            events_applied += events.len() as u64;
            projection.apply(&mut transaction, &shadow, &events).await?;
        }
        for table in tables {
            swap_in_shadow_table(&mut transaction, self.database.is_postgres(), &run, table)
                .await?;
        }
        save_checkpoints(&mut transaction, &[(name, position)]).await?;
        transaction.commit().await?;
        progress(RebuildProgress {
            position,
            head: position,
            events: events_applied,
        });
        Ok(RebuildReport {
            events: events_applied,
            position,
            elapsed: started.elapsed(),
        })
    }

    /// Rebuilds the projection named `name` from position 0 into shadow tables, up to exactly the live model's
    /// position, and compares the two: the rows of each that the other lacks. The live model is paused only for the
    /// final catch-up and the comparison (its checkpoint is held), then the shadow tables are dropped; nothing live
    /// changes.
    ///
    /// # Errors
    /// The database failed or an event cannot be applied.
    pub async fn verify(
        &self,
        name: &str,
        progress: &(dyn Fn(RebuildProgress) + Send + Sync),
    ) -> Result<VerifyReport, RunnerError> {
        let projection = self.find(name)?;
        if !projection.rebuildable() {
            return Err(RunnerError::NotRebuildable(name.to_string()));
        }
        self.register().await?;
        let started = Instant::now();
        let tables = projection.tables();
        let run = ShadowRun::new();
        let shadow = run.tables(tables);
        // Bulk phase, up to where the live model stands now (it only moves forward).
        let live_at_start: i64 =
            sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
                .bind(name)
                .fetch_one(self.database.any())
                .await?;
        let (mut position, mut events_applied) = self
            .fill_shadow(&projection, &run, live_at_start, progress)
            .await?;
        // Compare phase: hold the live checkpoint, catch the shadow up to it, diff, and throw the shadow away.
        let mut transaction = self.database.any().begin().await?;
        let live_position = lock_checkpoint(&mut transaction, name)
            .await?
            .map(|(live, _, _)| live)
            .unwrap_or(0);
        while position < live_position {
            let limit = self.rebuild_batch_size().min(live_position - position);
            let events = EventLog::read_after_with(&mut *transaction, position, limit).await?;
            let Some(last) = events.last() else { break };
            position = last.position;
            events_applied += events.len() as u64;
            projection.apply(&mut transaction, &shadow, &events).await?;
        }
        let mut differences = Vec::with_capacity(tables.len());
        for table in tables {
            let shadow_table = run.name(table);
            let count = |left: &str, right: &str| {
                format!("SELECT COUNT(*) FROM (SELECT * FROM {left} EXCEPT SELECT * FROM {right}) AS difference")
            };
            let only_live: i64 = sqlx::query_scalar(&count(table, &shadow_table))
                .fetch_one(&mut *transaction)
                .await?;
            let only_rebuilt: i64 = sqlx::query_scalar(&count(&shadow_table, table))
                .fetch_one(&mut *transaction)
                .await?;
            let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&mut *transaction)
                .await?;
            differences.push(TableDifference {
                table: (*table).to_string(),
                rows,
                only_live,
                only_rebuilt,
            });
        }
        transaction.rollback().await?;
        let mut connection = self.database.any().acquire().await?;
        for table in tables {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", run.name(table)))
                .execute(&mut *connection)
                .await?;
        }
        Ok(VerifyReport {
            events: events_applied,
            position,
            tables: differences,
            elapsed: started.elapsed(),
        })
    }

    /// Creates the projection's shadow tables and applies the log to them from position 0 up to `until`, batch by
    /// batch, each in its own transaction; where it stopped and how many events it applied.
    async fn fill_shadow(
        &self,
        projection: &Arc<dyn Projection>,
        run: &ShadowRun,
        until: i64,
        progress: &(dyn Fn(RebuildProgress) + Send + Sync),
    ) -> Result<(i64, u64), RunnerError> {
        let tables = projection.tables();
        let shadow = run.tables(tables);
        let mut connection = self.database.any().acquire().await?;
        for table in tables {
            create_shadow_table(&mut connection, self.database.is_postgres(), run, table).await?;
        }
        drop(connection);
        let log = self.database.log();
        let mut position = 0i64;
        let mut events_applied = 0u64;
        while position < until {
            let limit = self.rebuild_batch_size().min(until - position);
            let events = log.read_after(position, limit).await?;
            let Some(last) = events.last() else { break };
            let last_position = last.position;
            let mut transaction = self.database.any().begin().await?;
            projection.apply(&mut transaction, &shadow, &events).await?;
            transaction.commit().await?;
            position = last_position;
            events_applied += events.len() as u64;
            progress(RebuildProgress {
                position,
                head: until,
                events: events_applied,
            });
        }
        Ok((position, events_applied))
    }

    fn rebuild_batch_size(&self) -> i64 {
        self.batch_size.max(10_000)
    }
}

/// The position the projection named `name` has applied the log up to; `None` before its checkpoint is registered
/// (it has applied nothing). Readers that must see their own decisions wait for it to reach the log's head.
///
/// # Errors
/// The database failed.
pub async fn checkpoint_position(
    database: &Database,
    name: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
        .bind(name)
        .fetch_optional(database.any())
        .await
}

/// Locks the checkpoint row of `name` for the rest of the transaction and reads its position and status, with the
/// log's head in the same statement ([`lock_checkpoints`] of one name); `None` when it is not registered.
async fn lock_checkpoint(
    transaction: &mut Transaction<'_, Any>,
    name: &str,
) -> Result<Option<(i64, String, i64)>, sqlx::Error> {
    let (checkpoints, head) = lock_checkpoints(transaction, &[name]).await?;
    Ok(checkpoints
        .into_iter()
        .next()
        .map(|(_, position, status)| (position, status, head)))
}

/// Locks the checkpoint rows of `names` for the rest of the transaction, in the order of their names (so that
/// two steps of overlapping sets never wait on each other in a cycle), and reads each one's position and status,
/// and the log's head, in one statement (no extra round trip: a step gives the head to the watermark before it
/// reads on). On SQLite the lock is taken with an UPDATE: its first write takes the database's write lock, before
/// any read.
async fn lock_checkpoints(
    transaction: &mut Transaction<'_, Any>,
    names: &[&str],
) -> Result<(Vec<(String, i64, String)>, i64), sqlx::Error> {
    let postgres = transaction.backend_name() == "PostgreSQL";
    let placeholders = list_placeholders(1, names.len());
    let sql = if postgres {
        format!(
            "SELECT name, position, status, (SELECT position FROM event_log_head WHERE id = 1) AS head \
             FROM projection_checkpoints WHERE name IN ({placeholders}) ORDER BY name FOR UPDATE"
        )
    } else {
        format!(
            "UPDATE projection_checkpoints SET updated_at = updated_at WHERE name IN ({placeholders}) \
             RETURNING name, position, status, (SELECT position FROM event_log_head WHERE id = 1) AS head"
        )
    };
    let mut query = sqlx::query(&sql);
    for name in names {
        query = query.bind(*name);
    }
    let rows = query.fetch_all(&mut **transaction).await?;
    let mut head = 0;
    let mut checkpoints = Vec::with_capacity(rows.len());
    for row in rows {
        head = row.try_get("head")?;
        checkpoints.push((
            row.try_get("name")?,
            row.try_get("position")?,
            row.try_get("status")?,
        ));
    }
    Ok((checkpoints, head))
}

/// Moves each checkpoint in `applied` to the position beside it, in one statement.
async fn save_checkpoints(
    transaction: &mut Transaction<'_, Any>,
    applied: &[(&str, i64)],
) -> Result<(), sqlx::Error> {
    if applied.is_empty() {
        return Ok(());
    }
    let cases = (0..applied.len())
        .map(|index| {
            format!(
                "WHEN ${} THEN CAST(${} AS BIGINT)",
                2 * index + 2,
                2 * index + 3
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let names = (0..applied.len())
        .map(|index| format!("${}", 2 * index + 2))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "UPDATE projection_checkpoints SET position = CASE name {cases} END, status = '{STATUS_RUNNING}', \
         last_error = NULL, updated_at = $1 WHERE name IN ({names})"
    );
    let mut query = sqlx::query(&sql).bind(Utc::now().timestamp_millis());
    for (name, position) in applied {
        query = query.bind(*name).bind(*position);
    }
    query.execute(&mut **transaction).await?;
    Ok(())
}

/// Creates an empty copy of `table` (columns, keys and indexes, as `migrations/` made them) under its shadow name.
async fn create_shadow_table(
    connection: &mut AnyConnection,
    postgres: bool,
    run: &ShadowRun,
    table: &str,
) -> Result<(), sqlx::Error> {
    let shadow = run.name(table);
    sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}"))
        .execute(&mut *connection)
        .await?;
    if postgres {
        sqlx::query(&format!(
            "CREATE TABLE {shadow} (LIKE {table} INCLUDING ALL)"
        ))
        .execute(&mut *connection)
        .await?;
        return Ok(());
    }
    let table_sql: String =
        sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = $1")
            .bind(table)
            .fetch_one(&mut *connection)
            .await?;
    sqlx::query(&rename_reference(&table_sql, "TABLE", table, &shadow))
        .execute(&mut *connection)
        .await?;
    for (index_name, index_sql) in sqlite_indexes(connection, table).await? {
        let renamed = rename_reference(&index_sql, "INDEX", &index_name, &run.name(&index_name));
        let renamed = rename_reference(&renamed, "ON", table, &shadow);
        sqlx::query(&renamed).execute(&mut *connection).await?;
    }
    Ok(())
}

/// Replaces the live `table` by its shadow, keeping the live index names.
async fn swap_in_shadow_table(
    transaction: &mut Transaction<'_, Any>,
    postgres: bool,
    run: &ShadowRun,
    table: &str,
) -> Result<(), sqlx::Error> {
    let shadow = run.name(table);
    if postgres {
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&mut **transaction)
            .await?;
        sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {table}"))
            .execute(&mut **transaction)
            .await?;
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(indexname AS TEXT) FROM pg_indexes WHERE tablename = $1",
        )
        .bind(table)
        .fetch_all(&mut **transaction)
        .await?;
        for index in indexes {
            if let Some(suffix) = index.strip_prefix(&shadow) {
                sqlx::query(&format!("ALTER INDEX {index} RENAME TO {table}{suffix}"))
                    .execute(&mut **transaction)
                    .await?;
            }
        }
        return Ok(());
    }
    let live_indexes = sqlite_indexes(transaction, table).await?;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut **transaction)
        .await?;
    sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {table}"))
        .execute(&mut **transaction)
        .await?;
    for (index_name, index_sql) in live_indexes {
        sqlx::query(&format!("DROP INDEX IF EXISTS {}", run.name(&index_name)))
            .execute(&mut **transaction)
            .await?;
        sqlx::query(&index_sql).execute(&mut **transaction).await?;
    }
    Ok(())
}

async fn sqlite_indexes(
    connection: &mut AnyConnection,
    table: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL",
    )
    .bind(table)
    .fetch_all(&mut *connection)
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("name")?, row.try_get("sql")?)))
        .collect()
}

/// Renames the first reference `{keyword} old` in `sql` to `{keyword} new`, whether `old` is written bare or quoted
/// (SQLite writes a renamed table's name quoted): `CREATE TABLE "old" (` becomes `CREATE TABLE new (`.
fn rename_reference(sql: &str, keyword: &str, old: &str, new: &str) -> String {
    let candidates = [
        format!("{keyword} {old} "),
        format!("{keyword} {old}("),
        format!("{keyword} \"{old}\""),
        format!("{keyword} '{old}'"),
        format!("{keyword} `{old}`"),
        format!("{keyword} [{old}]"),
    ];
    let found = candidates
        .iter()
        .filter_map(|pattern| sql.find(pattern.as_str()).map(|at| (at, pattern)))
        .min_by_key(|(at, _)| *at);
    match found {
        Some((at, pattern)) => {
            let keep_last = pattern.ends_with(' ') || pattern.ends_with('(');
            let replaced_length = if keep_last {
                pattern.len() - 1
            } else {
                pattern.len()
            };
            format!(
                "{}{keyword} {new}{}",
                &sql[..at],
                &sql[at + replaced_length..]
            )
        }
        None => sql.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::rename_reference;

    #[test]
    fn a_created_table_is_renamed_only_in_its_create_clause() {
        assert_eq!(
            rename_reference(
                "CREATE TABLE aggregate_index (aggregate_index_id text)",
                "TABLE",
                "aggregate_index",
                "aggregate_index__rebuild"
            ),
            "CREATE TABLE aggregate_index__rebuild (aggregate_index_id text)"
        );
    }

    #[test]
    fn a_quoted_table_name_is_renamed_too() {
        assert_eq!(
            rename_reference(
                "CREATE TABLE \"aggregate_index\" (x text)",
                "TABLE",
                "aggregate_index",
                "aggregate_index__rebuild"
            ),
            "CREATE TABLE aggregate_index__rebuild (x text)"
        );
        assert_eq!(
            rename_reference("CREATE INDEX i ON \"t\"(x)", "ON", "t", "t__rebuild"),
            "CREATE INDEX i ON t__rebuild(x)"
        );
    }
}
