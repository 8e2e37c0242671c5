//! Executing commands against aggregates, whichever backend stores them.

use std::collections::{HashMap, HashSet};

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{
    EventStoreAggregateContext, PersistedEventRepository, PersistenceError, SerializedEvent,
};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};
use sqlite_es::SqliteEventRepository;
use whist_domain::decide::Lifecycle;
use whist_domain::EventMetadata;

use super::database::{Backend, Database};
use super::log::LogSignal;

use super::cached_store::{CacheBounds, CachedEventStore, Stale};
use super::postgres_repository::PostgresRepository;
use super::snapshots::Snapshots;

type PostgresStore<A> = CachedEventStore<PostgresRepository, A>;
type SqliteStore<A> = CachedEventStore<SqliteEventRepository, A>;

/// What each store (one per aggregate type) may remember between commands (see `cached_store`): 100,000 copies
/// and 24 MiB of state, whichever comes first.
const REMEMBERED: CacheBounds = CacheBounds {
    entries: 100_000,
    bytes: 24 << 20,
};

enum Frameworks<A: Aggregate + Clone> {
    Postgres { store: PostgresStore<A> },
    Sqlite { store: SqliteStore<A> },
}

/// Why a command did not record its events.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command: a business rule, stable and safe to show.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Another command on the same aggregate committed first (optimistic concurrency). Retrying may succeed.
    #[error("another command on the same aggregate committed first")]
    Conflict,
    /// The store failed: the database is unreachable or returned an error, or stored data could not be read.
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl<E: std::error::Error + 'static> From<AggregateError<E>> for CommandError<E> {
    fn from(error: AggregateError<E>) -> Self {
        match error {
            AggregateError::UserError(rejection) => Self::Rejected(rejection),
            AggregateError::AggregateConflict => Self::Conflict,
            AggregateError::DatabaseConnectionError(source)
            | AggregateError::DeserializationError(source)
            | AggregateError::UnexpectedError(source) => Self::Store(source),
        }
    }
}

/// How many times `execute_retrying` decides a command before it reports a conflict.
const CONFLICT_ATTEMPTS: u64 = 10;

/// Loads aggregates and executes commands on them; every event is stored with its metadata.
///
/// Snapshots are deliberately not used: cqrs-es 0.5 applies every event twice in its snapshot modes. Instead the
/// store remembers aggregates between commands; a stale copy costs a conflict, never a wrong decision.
pub struct AggregateStore<A: Aggregate + Clone> {
    frameworks: Frameworks<A>,
    services: A::Services,
    signal: LogSignal,
    database: Database,
}

impl<A> AggregateStore<A>
where
    A: Aggregate + Lifecycle + Clone + 'static,
    A::Services: Clone,
{
    /// A store for aggregates of type `A` in `database`, with the services its `handle` receives.
    pub fn new(database: &Database, services: A::Services) -> Self {
        Self::build(database, services, false)
    }

    /// A store for aggregates of type `A` of which there is one per deployment, whose id only this code names:
    /// like [`AggregateStore::new`], but one that was never written is remembered as such, so that reading it
    /// caught up costs one small read rather than a cold load each time.
    pub fn singleton(database: &Database, services: A::Services) -> Self {
        Self::build(database, services, true)
    }

    fn build(database: &Database, services: A::Services, remembers_empty: bool) -> Self {
        // A kind whose histories never reach a snapshot point is loaded cold without looking for one.
        let snapshots = A::most_events()
            .is_none_or(|most| most >= super::snapshots::SNAPSHOT_EVERY)
            .then(|| Snapshots::new(database.backend().clone()));
        let frameworks = match database.backend() {
            Backend::Postgres(pool) => {
                let store = CachedEventStore::new(
                    PostgresRepository::new(pool.clone(), database.clone()),
                    PostgresRepository::new(pool.clone(), database.clone()),
                    REMEMBERED,
                    snapshots.clone(),
                    remembers_empty,
                );
                database.watermark().on_rewind(store.forgetter());
                database
                    .following()
                    .on_event_of(A::TYPE, store.behind_marker());
                Frameworks::Postgres { store }
            }
            Backend::Sqlite(pool) => {
                let store = CachedEventStore::new(
                    SqliteEventRepository::new(pool.clone()),
                    SqliteEventRepository::new(pool.clone()),
                    REMEMBERED,
                    snapshots,
                    remembers_empty,
                );
                database.watermark().on_rewind(store.forgetter());
                database
                    .following()
                    .on_event_of(A::TYPE, store.behind_marker());
                Frameworks::Sqlite { store }
            }
        };
        Self {
            frameworks,
            services,
            signal: database.signal().clone(),
            database: database.clone(),
        }
    }

    /// Loads the aggregate, lets it decide, and appends what it decided, with `metadata` on every event.
    ///
    /// # Errors
    /// `Rejected` when a rule refuses the command, `Conflict` when another command on the same aggregate
    /// committed first, `Store` when the database failed.
    #[tracing::instrument(level = "debug", skip_all, fields(aggregate = A::TYPE, aggregate_id = %aggregate_id))]
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        // A refusal is only final on fresh state or a settled copy: staging decides again after reading what a
        // remembered copy missed (see `stage`).
        let outcome = self.execute_once(aggregate_id, command, metadata).await;
        let label = match &outcome {
            Ok(()) => "recorded",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::Conflict) => "conflict",
            Err(CommandError::Store(_)) => "failed",
        };
        metrics::counter!("whist_commands_total", "aggregate" => A::TYPE, "outcome" => label)
            .increment(1);
        if outcome.is_ok() {
            self.signal.advanced();
        }
        outcome
    }

    /// As [`AggregateStore::execute`], but a conflict is not an answer: the command is decided again on fresh
    /// state, up to `CONFLICT_ATTEMPTS` times, with a short growing pause between attempts. For decisions made
    /// away from a request (the autoscaler, the sweeps, the release workflow) on aggregates others write to.
    ///
    /// # Errors
    /// As `execute`; `Conflict` only after every attempt lost.
    pub async fn execute_retrying(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut attempt: u64 = 0;
        loop {
            match self.execute(aggregate_id, command.clone(), metadata).await {
                Err(CommandError::Conflict) if attempt + 1 < CONFLICT_ATTEMPTS => {
                    self.mark_stale(aggregate_id, Stale::Conflict);
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(attempt * 5)).await;
                }
                outcome => return outcome,
            }
        }
    }

    async fn execute_once(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        // The one write path: a single command is a unit of one aggregate, staged and committed as any unit is,
        // so remembered copies, conflicts and metrics are handled in one place.
        let mut unit = Unit::new(metadata);
        self.stage(&mut unit, aggregate_id, vec![command]).await?;
        if unit.is_empty() {
            return Ok(());
        }
        unit.commit(&self.database)
            .await
            .map_err(|error| match error {
                UnitError::Conflict => CommandError::Conflict,
                UnitError::Store(source) => CommandError::Store(source),
            })
    }

    /// Lets the aggregate decide `commands`, one after the other, and stages the events in `unit`, to be recorded
    /// with the rest of the unit or not at all (`Unit::commit`). Nothing is written here.
    ///
    /// # Errors
    /// `Rejected` when a rule refuses a command (on fresh state: a refusal on a remembered copy is retried after
    /// reading what the copy missed), `Store` when the database failed or the aggregate is already in the unit.
    ///
    /// Deciding nothing is only final on fresh state too: a remembered copy that missed another process's events
    /// can find an idempotent command already satisfied (a slot freed that, to the copy, was never taken). Staging
    /// nothing would then record the rest of the unit without this aggregate and without any check of its version,
    /// so the decision is taken again after reading what the copy missed.
    ///
    /// Except on a settled copy ([`Lifecycle::is_settled`]: an ended mandelbox, an ended session): no event it may
    /// have missed can change a refusal or a decision of nothing there, so both are final without a read.
    pub async fn stage(
        &self,
        unit: &mut Unit,
        aggregate_id: &str,
        commands: Vec<A::Command>,
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        self.stage_from(unit, aggregate_id, commands, Freshness::Remembered)
            .await
    }

    /// Stages `commands` on an aggregate the caller presumes has no events yet (an id it has just generated, or a
    /// session the desktop app names anew), without reading the store. The presumption is checked where every
    /// decision is checked: the unit's append collides on sequence 1 if any event exists and records nothing, and
    /// this store then reads the aggregate's history before its next decision. So a wrong presumption costs the
    /// unit one attempt, never a decision on the wrong state. A refusal, or deciding nothing, is only final on the
    /// real state: the aggregate is then read and the commands decided again. An aggregate this process remembers
    /// is staged as `stage` does.
    ///
    /// # Errors
    /// As `stage`.
    pub async fn stage_new(
        &self,
        unit: &mut Unit,
        aggregate_id: &str,
        commands: Vec<A::Command>,
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let first = if self.is_remembered(aggregate_id) {
            Freshness::Remembered
        } else {
            Freshness::PresumedNew
        };
        self.stage_from(unit, aggregate_id, commands, first).await
    }

    /// Decides on the `first` copy; a refusal or no decision there is decided again on fresh state (the copy
    /// brought up to date, or the aggregate read whole when there is none), unless the copy was settled
    /// ([`Lifecycle::is_settled`]: no event it may have missed can change such a decision).
    async fn stage_from(
        &self,
        unit: &mut Unit,
        aggregate_id: &str,
        commands: Vec<A::Command>,
        first: Freshness,
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        match self
            .stage_once(unit, aggregate_id, commands.clone(), first)
            .await
        {
            Ok(Staged::Nothing) => {
                self.mark_stale(aggregate_id, Stale::DecidedAgain);
                self.stage_once(unit, aggregate_id, commands, Freshness::CaughtUp)
                    .await
                    .map(|_| ())
            }
            outcome => outcome.map(|_| ()),
        }
    }

    fn is_remembered(&self, aggregate_id: &str) -> bool {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.is_remembered(aggregate_id),
            Frameworks::Sqlite { store, .. } => store.is_remembered(aggregate_id),
        }
    }

    async fn stage_once(
        &self,
        unit: &mut Unit,
        aggregate_id: &str,
        commands: Vec<A::Command>,
        copy: Freshness,
    ) -> Result<Staged, CommandError<A::Error>> {
        let mut loaded = if copy == Freshness::PresumedNew {
            self.presumed_new(aggregate_id)
        } else {
            self.load_copy(aggregate_id).await?
        };
        // A caught-up copy is final whatever it decides, even when it was remembered without a read.
        if copy == Freshness::CaughtUp {
            loaded.freshness = Freshness::CaughtUp;
        }
        let settled = loaded.state.is_settled();
        let mut events = Vec::new();
        for command in commands {
            let sink = EventSink::<A>::default();
            if let Err(refusal) = loaded.state.handle(command, &self.services, &sink).await {
                // Final on fresh state, or on a settled copy the commands had not changed yet; else decide
                // again on fresh state.
                if loaded.freshness == Freshness::CaughtUp || (settled && events.is_empty()) {
                    return Err(CommandError::Rejected(refusal));
                }
                return Ok(Staged::Nothing);
            }
            events.extend(sink.collect().await);
        }
        // The sink applied each event to the state as it was written.
        self.stage_after(unit, loaded, events)
    }

    /// An aggregate as this process remembers it, to decide on: read whole when nothing is remembered, brought up
    /// to date first when its copy is marked stale. [`Loaded::is_fresh`] says whether it was read just now; a
    /// decision that refuses, or decides nothing, on a copy that was not is only final after
    /// [`AggregateStore::decide_again`] and a decision on the fresh copy the next load gives.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    ///
    /// In a unit that reads fresh ([`Unit::reads_fresh`]: an attempt after one that had to decide again), every
    /// copy is brought up to date first, so that the copies one decision needs fresh are fresh together.
    pub async fn load_to_decide(
        &self,
        unit: &Unit,
        aggregate_id: &str,
    ) -> Result<Loaded<A>, CommandError<A::Error>> {
        if unit.reads_fresh {
            self.mark_stale(aggregate_id, Stale::UnitReadsFresh);
        }
        Ok(self.load_copy(aggregate_id).await?)
    }

    /// An aggregate the caller presumes has no events yet (an id it has just generated, or a session the desktop
    /// app names anew), without reading the store, unless this process remembers it (see `stage_new` for why a
    /// wrong presumption costs an attempt, never a wrong decision).
    ///
    /// # Errors
    /// The database failed or an event could not be read (only when a remembered copy is brought up to date).
    pub async fn load_to_decide_new(
        &self,
        unit: &Unit,
        aggregate_id: &str,
    ) -> Result<Loaded<A>, CommandError<A::Error>> {
        if self.is_remembered(aggregate_id) {
            self.load_to_decide(unit, aggregate_id).await
        } else {
            Ok(self.presumed_new(aggregate_id))
        }
    }

    /// As [`AggregateStore::load_to_decide`], brought up to date first (one small read): for decisions whose
    /// outcome is read before anything is staged (which user a Stripe customer belongs to).
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_to_decide_caught_up(
        &self,
        aggregate_id: &str,
    ) -> Result<Loaded<A>, CommandError<A::Error>> {
        self.mark_stale(aggregate_id, Stale::Asked);
        Ok(self.load_copy(aggregate_id).await?)
    }

    /// Aggregates to decide on, each read just now (refusals on them are final), in the order of `aggregate_ids`
    /// (distinct): the remembered copies brought up to date together, in one statement on Postgres whatever their
    /// number, the others read whole. For a decision that passed several over on copies that may be behind and must
    /// now be sure of them all (no host had room).
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_to_decide_caught_up_many(
        &self,
        aggregate_ids: &[String],
    ) -> Result<Vec<Loaded<A>>, CommandError<A::Error>> {
        let contexts = match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.load_caught_up_many(aggregate_ids).await?,
            Frameworks::Sqlite { store, .. } => store.load_caught_up_many(aggregate_ids).await?,
        };
        Ok(contexts
            .into_iter()
            .map(|context| Loaded {
                id: context.aggregate_id,
                state: context.aggregate,
                version: context.current_sequence,
                freshness: Freshness::CaughtUp,
            })
            .collect())
    }

    /// Makes the next load of `loaded`'s aggregate fresh: for a decision that refused, or decided nothing, on a
    /// copy that may have been behind. Nothing to do for a copy that was fresh.
    pub fn decide_again(&self, loaded: &Loaded<A>) {
        if loaded.decides_finally() {
            return;
        }
        match loaded.freshness {
            Freshness::CaughtUp => {}
            Freshness::PresumedNew => match &self.frameworks {
                Frameworks::Postgres { store, .. } => store.remember_unread(&loaded.id),
                Frameworks::Sqlite { store, .. } => store.remember_unread(&loaded.id),
            },
            Freshness::Remembered => self.mark_stale(&loaded.id, Stale::DecidedAgain),
        }
    }

    /// Stages `events`, decided on `loaded`'s state, in `unit`, to be recorded with the rest of the unit or not at
    /// all, under a check that the aggregate is still at `loaded`'s version. Nothing is written here.
    ///
    /// `Ok(false)`, staging nothing, when `events` is empty and `loaded` may be behind: deciding nothing is only
    /// final on fresh state (a stale copy can find an idempotent step already done that, for real, is not), so
    /// the decision must be taken again (the copy is marked for [`AggregateStore::decide_again`]).
    ///
    /// # Errors
    /// `Store` when the aggregate is already in the unit or an event could not be serialised.
    pub fn stage_events(
        &self,
        unit: &mut Unit,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<bool, CommandError<A::Error>> {
        let mut loaded = loaded;
        for event in &events {
            loaded.state.apply(event.clone());
        }
        match self.stage_after(unit, loaded, events)? {
            Staged::Decided => Ok(true),
            Staged::Nothing => Ok(false),
        }
    }

    fn presumed_new(&self, aggregate_id: &str) -> Loaded<A> {
        Loaded {
            id: aggregate_id.to_string(),
            state: A::default(),
            version: 0,
            freshness: Freshness::PresumedNew,
        }
    }

    async fn load_copy(&self, aggregate_id: &str) -> Result<Loaded<A>, AggregateError<A::Error>> {
        let (context, read) = match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.load_read(aggregate_id).await?,
            Frameworks::Sqlite { store, .. } => store.load_read(aggregate_id).await?,
        };
        Ok(Loaded {
            id: aggregate_id.to_string(),
            state: context.aggregate,
            version: context.current_sequence,
            freshness: if read {
                Freshness::CaughtUp
            } else {
                Freshness::Remembered
            },
        })
    }

    /// Stages `events`, decided on the copy at `loaded`'s version and already applied to its state.
    fn stage_after(
        &self,
        unit: &mut Unit,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<Staged, CommandError<A::Error>> {
        let Loaded {
            id,
            state: after,
            version,
            freshness,
        } = loaded;
        if unit.staged.contains(&(A::TYPE.to_string(), id.clone())) {
            return Err(CommandError::Store(
                format!("{} {id} is staged twice in one unit", A::TYPE).into(),
            ));
        }
        if events.is_empty() && freshness != Freshness::CaughtUp && !after.is_settled() {
            self.decide_again(&Loaded {
                id,
                state: after,
                version,
                freshness,
            });
            return Ok(Staged::Nothing);
        }
        let after_version = version + events.len();
        for (payload, sequence) in events.into_iter().zip(version + 1..) {
            let envelope = EventEnvelope::<A> {
                aggregate_id: id.clone(),
                sequence,
                payload,
                metadata: unit.metadata.clone(),
            };
            let serialized = SerializedEvent::try_from(&envelope)
                .map_err(|error| CommandError::Store(Box::new(error)))?;
            unit.events.push(serialized);
        }
        unit.staged.insert((A::TYPE.to_string(), id.clone()));
        if after_version == version && freshness != Freshness::CaughtUp {
            // A settled copy that decided nothing: it is remembered as it was (stale, should the log follower have
            // marked it so), and nothing of it is checked or recorded.
            return Ok(Staged::Decided);
        }
        let presumed = freshness == Freshness::PresumedNew;
        let settle = match &self.frameworks {
            Frameworks::Postgres { store, .. } => {
                settler(store.clone(), id, after, (version, after_version), presumed)
            }
            Frameworks::Sqlite { store, .. } => {
                settler(store.clone(), id, after, (version, after_version), presumed)
            }
        };
        unit.settle.push(settle);
        Ok(Staged::Decided)
    }

    /// The remembered copy (read whole on a miss, brought up to date when marked stale).
    async fn remembered_context(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.load_aggregate(aggregate_id).await,
            Frameworks::Sqlite { store, .. } => store.load_aggregate(aggregate_id).await,
        }
    }

    /// The aggregate as this process last knew it, brought up to date with the events it missed (one small read),
    /// and its version.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_caught_up(
        &self,
        aggregate_id: &str,
    ) -> Result<(A, usize), CommandError<A::Error>> {
        self.mark_stale(aggregate_id, Stale::Asked);
        let context = self.remembered_context(aggregate_id).await?;
        Ok((context.aggregate, context.current_sequence))
    }

    /// The aggregate as of the log, and its version: the remembered copy while the process's log follower is
    /// current (then the copy holds every event the follower has read, at most `FOLLOW_LAG_BOUND` behind the
    /// log; a copy an event made stale is brought up to date first), else as [`AggregateStore::load_caught_up`].
    /// For reads on every request that would otherwise cost a statement each (the subscription, the maintenance
    /// switch) and checks before a side effect; never for a refusal that must be final.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_as_of_log(
        &self,
        aggregate_id: &str,
    ) -> Result<(A, usize), CommandError<A::Error>> {
        let followed = self.database.following().is_current();
        let how = if followed { "followed" } else { "caught_up" };
        metrics::counter!("whist_as_of_log_loads_total", "aggregate" => A::TYPE, "how" => how)
            .increment(1);
        if followed {
            self.load_possibly_stale(aggregate_id).await
        } else {
            self.load_caught_up(aggregate_id).await
        }
    }

    /// As [`AggregateStore::load_as_of_log`], read caught up when `refuses` says the copy as of the log would refuse
    /// (a refusal is only final on fresh state): for checks whose "no" must hold at once and whose "yes" may lag
    /// the log by `FOLLOW_LAG_BOUND` (a subscription, the maintenance switch).
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_as_of_log_unless(
        &self,
        aggregate_id: &str,
        refuses: impl Fn(&A) -> bool,
    ) -> Result<(A, usize), CommandError<A::Error>> {
        let loaded = self.load_as_of_log(aggregate_id).await?;
        if refuses(&loaded.0) {
            return self.load_caught_up(aggregate_id).await;
        }
        Ok(loaded)
    }

    /// Whether a copy of the aggregate is remembered and not marked behind: the next load serves it without a read.
    pub fn remembers_current(&self, aggregate_id: &str) -> bool {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.remembers_current(aggregate_id),
            Frameworks::Sqlite { store, .. } => store.remembers_current(aggregate_id),
        }
    }

    /// Marks the remembered copy of one aggregate as behind, so that the next command first reads what it missed.
    pub fn mark_stale(&self, aggregate_id: &str, why: Stale) {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.mark_stale(aggregate_id, why),
            Frameworks::Sqlite { store, .. } => store.mark_stale(aggregate_id, why),
        }
    }

    /// Forgets the remembered copy of one aggregate, so that the next command loads it from the database.
    pub fn forget(&self, aggregate_id: &str) {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.forget(aggregate_id),
            Frameworks::Sqlite { store, .. } => store.forget(aggregate_id),
        }
    }

    /// The aggregate as this process remembers it, possibly behind the store (read from the database only when
    /// nothing is remembered). Only for facts that never change once recorded, such as where a mandelbox was
    /// placed: a caller that finds the fact missing must `load_from_history` before concluding it is absent.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_possibly_stale(
        &self,
        aggregate_id: &str,
    ) -> Result<(A, usize), CommandError<A::Error>> {
        let context = self.remembered_context(aggregate_id).await?;
        Ok((context.aggregate, context.current_sequence))
    }

    /// The aggregate's current state and version (0 when it has no events), read from its whole history in the
    /// database, whatever this process remembers.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_from_history(
        &self,
        aggregate_id: &str,
    ) -> Result<(A, usize), CommandError<A::Error>> {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => {
                let context = store.load_fresh(aggregate_id).await?;
                let version = context.current_sequence;
                Ok((context.aggregate, version))
            }
            Frameworks::Sqlite { store, .. } => {
                let context = store.load_fresh(aggregate_id).await?;
                let version = context.current_sequence;
                Ok((context.aggregate, version))
            }
        }
    }
}

/// What a store does with its copy of a staged aggregate once the unit is settled. `presumed_new`: the aggregate
/// was staged as new without being read, so a conflict means it has events this process never read.
fn settler<R, A>(
    store: CachedEventStore<R, A>,
    id: String,
    aggregate: A,
    (before, after): (usize, usize),
    presumed_new: bool,
) -> Box<dyn FnOnce(Settled) + Send + Sync>
where
    R: PersistedEventRepository + 'static,
    A: Aggregate + Clone + 'static,
{
    Box::new(move |settled| match settled {
        Settled::Committed => store.committed(&id, aggregate, before, after),
        Settled::Conflicted if presumed_new => store.remember_unread(&id),
        Settled::Conflicted => store.mark_stale(&id, Stale::Conflict),
        Settled::Failed => store.forget(&id),
    })
}

/// Which copy of an aggregate a staging decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    /// The copy this process remembers, possibly behind other processes' appends.
    Remembered,
    /// The remembered copy after reading what it missed.
    CaughtUp,
    /// No copy: the aggregate is presumed to have no events, unread (`stage_new`).
    PresumedNew,
}

/// An aggregate read to decide on: its state, its version, and how fresh the read was. Staged with
/// [`AggregateStore::stage_events`], which checks at commit that the aggregate is still at this version.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    id: String,
    state: A,
    version: usize,
    freshness: Freshness,
}

impl<A> Loaded<A> {
    /// The aggregate's state as read.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// The aggregate's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The aggregate's version as read: the sequence number of its last event.
    pub fn version(&self) -> usize {
        self.version
    }

    /// Whether the state was read from the database just now.
    pub fn is_fresh(&self) -> bool {
        self.freshness == Freshness::CaughtUp
    }
}

impl<A: Lifecycle> Loaded<A> {
    /// Whether a refusal, or a decision of nothing, taken on this copy is final: it was read fresh, or it is
    /// settled ([`Lifecycle::is_settled`]), so no event it may have missed can change the decision.
    pub fn decides_finally(&self) -> bool {
        self.is_fresh() || self.state.is_settled()
    }
}

/// What a staging did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staged {
    /// Events (possibly none, on a caught-up copy) are staged and the aggregate is part of the unit.
    Decided,
    /// A copy that may be behind, and is not settled, decided nothing or refused: nothing was staged, and the
    /// decision must be taken on fresh state.
    Nothing,
}

#[derive(Clone, Copy)]
enum Settled {
    Committed,
    Conflicted,
    Failed,
}

/// Decisions of several aggregates (one command or more each), recorded together or not at all: either every
/// event of the unit is stored, or none is. Built with `AggregateStore::stage`, recorded with `commit`.
pub struct Unit {
    metadata: HashMap<String, String>,
    events: Vec<SerializedEvent>,
    staged: HashSet<(String, String)>,
    settle: Vec<Box<dyn FnOnce(Settled) + Send + Sync>>,
    /// Every copy loaded for this unit is brought up to date first (see [`Unit::reading_fresh`]).
    reads_fresh: bool,
}

/// Why a unit was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// Another writer appended to one of the unit's aggregates first; nothing was recorded. Staging again (on the
    /// fresh state this reads) may succeed.
    #[error("another command on one of the unit's aggregates committed first")]
    Conflict,
    /// The store failed; nothing was recorded.
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// The stored metadata of a unit's events: `metadata`, with the trace context of the span recording the unit when
/// the decision named none (the reconciler's job for a decision continues that trace).
fn traced(metadata: &EventMetadata) -> HashMap<String, String> {
    if metadata.traceparent.is_some() {
        return metadata.to_map();
    }
    metadata
        .clone()
        .in_trace(crate::trace_context::current_traceparent())
        .to_map()
}

impl Unit {
    /// An empty unit whose events will all carry `metadata`.
    pub fn new(metadata: &EventMetadata) -> Self {
        Self {
            metadata: traced(metadata),
            events: Vec::new(),
            staged: HashSet::new(),
            settle: Vec::new(),
            reads_fresh: false,
        }
    }

    /// An empty unit whose decisions are taken on fresh copies only: each copy loaded for it
    /// ([`AggregateStore::load_to_decide`]) is brought up to date first. For the attempt after one that had to
    /// decide again because a copy may have been behind: marking only the copies that were behind would let the
    /// ones read fresh in that attempt be remembered copies in the next, and two copies that must be fresh together
    /// would take turns being behind, attempt after attempt.
    pub fn reading_fresh(metadata: &EventMetadata) -> Self {
        Self {
            reads_fresh: true,
            ..Self::new(metadata)
        }
    }

    /// Makes every event of the unit carry `metadata` instead: for a decision that learns which chain it continues
    /// only once it knows it records something (a host's status report reads its mandelbox's last event only
    /// then).
    ///
    /// # Errors
    /// `Store` when events are already staged: they carry the metadata the unit had.
    pub fn carry(&mut self, metadata: &EventMetadata) -> Result<(), UnitError> {
        if !self.events.is_empty() {
            return Err(UnitError::Store(
                "a unit's metadata is set before its events are staged".into(),
            ));
        }
        self.metadata = traced(metadata);
        Ok(())
    }

    /// Whether copies loaded for this unit are brought up to date first.
    pub fn reads_fresh(&self) -> bool {
        self.reads_fresh
    }

    /// Events staged so far.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Records the unit as part of a retry loop: `Ok(true)` once it is recorded (or when nothing was staged, so
    /// there is nothing to record), `Ok(false)` when another writer got to one of its aggregates first and the
    /// decisions must be staged again on the fresh state the stores now read.
    ///
    /// # Errors
    /// The store failed; nothing was recorded.
    pub async fn record(self, database: &Database) -> Result<bool, UnitError> {
        if self.is_empty() {
            return Ok(true);
        }
        match self.commit(database).await {
            Ok(()) => Ok(true),
            Err(UnitError::Conflict) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Records every staged event in one all-or-nothing append; afterwards the stores remember the new states
    /// (or, after a conflict, read what they missed before their next decision).
    ///
    /// # Errors
    /// `Conflict` when another writer appended to one of the aggregates first, `Store` when the database failed;
    /// nothing was recorded either way.
    pub async fn commit(self, database: &Database) -> Result<(), UnitError> {
        let (outcome, settled) = match database.append_unit(self.events).await {
            Ok(()) => (Ok(()), Settled::Committed),
            Err(PersistenceError::OptimisticLockError) => {
                (Err(UnitError::Conflict), Settled::Conflicted)
            }
            Err(
                PersistenceError::ConnectionError(error)
                | PersistenceError::DeserializationError(error)
                | PersistenceError::UnknownError(error),
            ) => (Err(UnitError::Store(error)), Settled::Failed),
        };
        let label = match settled {
            Settled::Committed => "recorded",
            Settled::Conflicted => "conflict",
            Settled::Failed => "failed",
        };
        for settle in self.settle {
            settle(settled);
        }
        metrics::counter!("whist_units_total", "outcome" => label).increment(1);
        if outcome.is_ok() {
            database.signal().advanced();
        }
        outcome
    }
}
