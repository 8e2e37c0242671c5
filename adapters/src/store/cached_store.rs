//! An event store that remembers the aggregates it has loaded or committed.
//!
//! cqrs-es loads an aggregate's whole history before every command. This store keeps each aggregate's state and
//! version after a successful commit, and hands a copy to the next command. A copy can be stale when another
//! process appended since; the append then collides with that process's sequence number (the primary key), the
//! command fails with a conflict, the copy is marked stale, and a retry first reads the events it missed (only
//! those, not the whole history). So a stale copy can
//! cost a retry but never a decision on old state. (cqrs-es's own snapshot modes are not used: in 0.5 they apply
//! every event twice.)

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_es::persist::{
    EventStoreAggregateContext, EventUpcaster, PersistedEventRepository, PersistedEventStore,
    PersistenceError, SerializedEvent,
};
use cqrs_es::{Aggregate, AggregateError, EventEnvelope, EventStore};

use super::snapshots::{self, Snapshots};

/// See the module documentation. Clones share the same store and memory.
pub struct CachedEventStore<R: PersistedEventRepository, A: Aggregate> {
    shared: Arc<Shared<R, A>>,
}

struct Shared<R: PersistedEventRepository, A: Aggregate> {
    inner: PersistedEventStore<R, A>,
    /// Reads only the events after a remembered version, to bring a stale copy up to date cheaply.
    catch_up: R,
    cache: quick_cache::sync::Cache<String, Remembered<A>, CopyWeight>,
    /// `None` for a kind whose histories never reach a snapshot point (a mandelbox's life is a few events): a cold
    /// load then reads the events alone, without first looking for a snapshot that cannot exist.
    snapshots: Option<Snapshots>,
    /// The last keys the log follower read for this type; its marker and `remember` take this lock.
    followed: std::sync::Mutex<RecentlyFollowed>,
    /// Whether an aggregate with no events is remembered too: for a store of singletons, whose ids only this code
    /// names (the service switch, the image catalog, the fleet's leadership), so that reading one that was never
    /// written costs one catch-up read instead of a cold load each time.
    remembers_empty: bool,
}

/// How much remembering aggregates of one type may take: at most `entries` copies and `bytes` bytes of state (as
/// the state serialises; the copy in memory is of the same order). Beyond either bound the cache forgets the copies
/// used least recently (CLOCK-Pro), which the next command reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheBounds {
    pub entries: usize,
    pub bytes: u64,
}

/// A copy weighs its bytes, and at least the byte budget's share of one entry, so that the budget also bounds the
/// number of copies.
#[derive(Clone)]
struct CopyWeight {
    floor: u64,
}

impl<A> quick_cache::Weighter<String, Remembered<A>> for CopyWeight {
    fn weight(&self, key: &String, remembered: &Remembered<A>) -> u64 {
        (remembered.bytes + key.len() as u64).max(self.floor)
    }
}

/// Why a remembered copy was marked behind the store (`whist_copies_marked_stale_total{why}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Its append collided: another writer appended first.
    Conflict,
    /// The log follower read a newer event of it: another process's, or this process's own before the commit
    /// that recorded it remembered its copy (which then replaces the marked one).
    Followed,
    /// A decision refused, or decided nothing, on it: decided again on fresh state.
    DecidedAgain,
    /// A unit that reads every copy fresh (an attempt after one that had to decide again).
    UnitReadsFresh,
    /// A read asked for it caught up.
    Asked,
    /// It was presumed new and was not.
    PresumedNew,
}

impl Stale {
    fn as_str(self) -> &'static str {
        match self {
            Self::Conflict => "conflict",
            Self::Followed => "followed",
            Self::DecidedAgain => "decided_again",
            Self::UnitReadsFresh => "unit_reads_fresh",
            Self::Asked => "asked",
            Self::PresumedNew => "presumed_new",
        }
    }
}

fn count_stale<A: Aggregate>(why: Stale) {
    metrics::counter!("whist_copies_marked_stale_total", "aggregate" => A::TYPE, "why" => why.as_str())
        .increment(1);
}

/// Keys the log follower read last, at most [`RecentlyFollowed::KEPT`] aggregates: the highest sequence of each.
/// A load or commit that began before the follower read one of these events and ends after it (microseconds to
/// milliseconds) checks here; one that outlasts `KEPT` newer aggregates of its type is not covered.
#[derive(Default)]
struct RecentlyFollowed {
    highest: HashMap<String, i64>,
    order: std::collections::VecDeque<String>,
}

impl RecentlyFollowed {
    const KEPT: usize = 4096;

    fn saw(&mut self, aggregate_id: &str, sequence: i64) {
        match self.highest.get_mut(aggregate_id) {
            Some(highest) => *highest = (*highest).max(sequence),
            None => {
                self.highest.insert(aggregate_id.to_string(), sequence);
                self.order.push_back(aggregate_id.to_string());
                if self.order.len() > Self::KEPT {
                    if let Some(oldest) = self.order.pop_front() {
                        self.highest.remove(&oldest);
                    }
                }
            }
        }
    }

    fn newer_than(&self, aggregate_id: &str, version: usize) -> bool {
        self.highest
            .get(aggregate_id)
            .is_some_and(|&sequence| sequence > version as i64)
    }
}

/// Counts the bytes serde writes, without keeping them.
struct ByteCount(u64);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len() as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of a state as it serialises.
fn state_bytes(state: &impl serde::Serialize) -> u64 {
    let mut count = ByteCount(0);
    match serde_json::to_writer(&mut count, state) {
        Ok(()) => count.0,
        Err(_) => 0,
    }
}

/// A remembered aggregate; `stale` when it may be behind the store (it is brought up to date before its next use),
/// `bytes`: its state's size, its weight in the cache.
#[derive(Clone)]
struct Remembered<A> {
    aggregate: A,
    version: usize,
    stale: bool,
    bytes: u64,
}

impl<R: PersistedEventRepository, A: Aggregate + Clone> Shared<R, A> {
    /// Marks the remembered copy, if there is one not marked yet and `behind` says it is, as behind the store
    /// (counted by `why`). (Two changes at once may lose one: a copy marked stale may come back unmarked only when
    /// a commit remembered it afresh, and a copy that is behind only costs a conflict, never a wrong decision.)
    fn mark_stale_when(
        &self,
        aggregate_id: &str,
        why: Stale,
        behind: impl FnOnce(&Remembered<A>) -> bool,
    ) {
        if let Some(mut remembered) = self.cache.peek(aggregate_id) {
            if remembered.stale || !behind(&remembered) {
                return;
            }
            count_stale::<A>(why);
            remembered.stale = true;
            let _ = self
                .cache
                .replace(aggregate_id.to_string(), remembered, true);
        }
    }
}

impl<R: PersistedEventRepository, A: Aggregate> Clone for CachedEventStore<R, A> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<R, A> CachedEventStore<R, A>
where
    R: PersistedEventRepository,
    A: Aggregate + Clone,
{
    /// A store over `repository` that remembers aggregates within `bounds`; `catch_up` reads the events a stale
    /// copy misses (and those after a snapshot); `snapshots` holds the aggregates' snapshots (`None` for a kind
    /// whose histories never reach a snapshot point); `remembers_empty` says whether an aggregate with no events is
    /// remembered too (a store of singletons).
    pub(crate) fn new(
        repository: R,
        catch_up: R,
        bounds: CacheBounds,
        snapshots: Option<Snapshots>,
        remembers_empty: bool,
    ) -> Self {
        let entries = bounds.entries.max(1);
        Self {
            shared: Arc::new(Shared {
                inner: PersistedEventStore::new_event_store(repository)
                    .with_upcasters(vec![Box::new(DomainUpcaster)]),
                catch_up,
                cache: quick_cache::sync::Cache::with_weighter(
                    entries,
                    bounds.bytes,
                    CopyWeight {
                        floor: (bounds.bytes / entries as u64).max(1),
                    },
                ),
                snapshots,
                followed: std::sync::Mutex::new(RecentlyFollowed::default()),
                remembers_empty,
            }),
        }
    }

    /// Remembers `aggregate` as a commit left it, from version `before` to `after`, and writes a snapshot when the
    /// commit crossed a snapshot point.
    pub(crate) fn committed(&self, aggregate_id: &str, aggregate: A, before: usize, after: usize) {
        if let Some(snapshots) = &self.shared.snapshots {
            if snapshots::due(before, after) {
                snapshots.write(aggregate_id, after, &aggregate);
            }
        }
        self.remember(aggregate_id, aggregate, after);
    }

    fn remembered(&self, aggregate_id: &str) -> Option<Remembered<A>> {
        let remembered = self.shared.cache.get(aggregate_id);
        let outcome = if remembered.is_some() { "hit" } else { "miss" };
        metrics::counter!("whist_remembered_copies_total", "aggregate" => A::TYPE, "outcome" => outcome)
            .increment(1);
        remembered
    }

    /// Whether a copy of the aggregate is remembered and not marked stale.
    pub(crate) fn remembers_current(&self, aggregate_id: &str) -> bool {
        self.shared
            .cache
            .peek(aggregate_id)
            .is_some_and(|remembered| !remembered.stale)
    }

    /// Whether a copy of the aggregate is remembered (up to date or stale).
    pub(crate) fn is_remembered(&self, aggregate_id: &str) -> bool {
        self.shared.cache.contains_key(aggregate_id)
    }

    /// Remembers that the aggregate has events this process has not read (it was presumed new and was not): the
    /// next command reads its whole history, through the catch-up from version 0.
    pub(crate) fn remember_unread(&self, aggregate_id: &str) {
        self.remember(aggregate_id, A::default(), 0);
        self.mark_stale(aggregate_id, Stale::PresumedNew);
    }

    /// Remembers `aggregate` at `version`, as committed.
    ///
    /// A copy read (or committed) just as the log follower read a newer event of the aggregate would miss it and
    /// not be marked (the marker found no copy, or the old one): the follower's last keys are checked under the
    /// same lock, and such a copy is remembered stale.
    pub(crate) fn remember(&self, aggregate_id: &str, aggregate: A, version: usize) {
        let bytes = state_bytes(&aggregate);
        let followed = self.shared.followed.lock();
        let stale = match &followed {
            Ok(followed) => followed.newer_than(aggregate_id, version),
            Err(_) => true,
        };
        if stale {
            count_stale::<A>(Stale::Followed);
        }
        self.shared.cache.insert(
            aggregate_id.to_string(),
            Remembered {
                aggregate,
                version,
                stale,
                bytes,
            },
        );
        drop(followed);
    }

    /// A hook for the store's `LogWatermark` that forgets every aggregate this store remembers, for as long as the
    /// store exists.
    pub(crate) fn forgetter(&self) -> impl Fn() + Send + Sync + 'static
    where
        R: 'static,
        A: 'static,
    {
        let shared = Arc::downgrade(&self.shared);
        move || {
            if let Some(shared) = shared.upgrade() {
                shared.cache.clear();
            }
        }
    }

    /// A marker for the log follower that marks the remembered copy of an aggregate as behind when an event of it
    /// (its sequence) is newer than the copy, for as long as the store exists.
    pub(crate) fn behind_marker(&self) -> impl Fn(&str, i64) + Send + Sync + 'static
    where
        R: 'static,
        A: 'static,
    {
        let shared = Arc::downgrade(&self.shared);
        move |aggregate_id, sequence| {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let Ok(mut followed) = shared.followed.lock() else {
                return;
            };
            followed.saw(aggregate_id, sequence);
            shared.mark_stale_when(aggregate_id, Stale::Followed, |remembered| {
                (remembered.version as i64) < sequence
            });
        }
    }

    /// Forgets one aggregate, so that the next command loads it whole.
    pub fn forget(&self, aggregate_id: &str) {
        self.shared.cache.remove(aggregate_id);
    }

    /// Marks a remembered copy as behind the store, so that the next command first reads what it missed.
    pub fn mark_stale(&self, aggregate_id: &str, why: Stale) {
        self.shared.mark_stale_when(aggregate_id, why, |_| true);
    }

    /// Carries `state`, known at `version`, on to the store's last event (upcast as a full load would): the state,
    /// its version and the events applied. The read starts at the event at `version` itself: `None` when the store
    /// no longer holds it (the log moved back below what `state` folded in), and then only the whole history tells
    /// what the aggregate is. At version 0 every stored event is applied.
    async fn continue_from(
        &self,
        aggregate_id: &str,
        state: A,
        version: usize,
    ) -> Result<Option<Continued<A>>, AggregateError<A::Error>> {
        count_catch_up_read::<A>();
        let events = self
            .shared
            .catch_up
            .get_last_events::<A>(aggregate_id, version.saturating_sub(1))
            .await?;
        continue_with(state, version, events)
    }

    /// Brings a stale copy up to date with the events after its version (one small read instead of the whole
    /// history), or reads the aggregate whole when the store no longer holds the copy's last event.
    async fn catch_up(
        &self,
        aggregate_id: &str,
        remembered: Remembered<A>,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        let continued = self
            .continue_from(aggregate_id, remembered.aggregate, remembered.version)
            .await?;
        match continued {
            Some(continued) => Ok(self.caught_up(aggregate_id, continued)),
            None => self.load_fresh(aggregate_id).await,
        }
    }

    /// A copy brought up to date, remembered as such.
    fn caught_up(
        &self,
        aggregate_id: &str,
        (state, version, applied): Continued<A>,
    ) -> EventStoreAggregateContext<A> {
        // Events another process appended since this copy was remembered: how stale copies of each type run.
        metrics::counter!("whist_catch_up_events_total", "aggregate" => A::TYPE)
            .increment(applied as u64);
        metrics::counter!("whist_aggregate_loads_total", "aggregate" => A::TYPE, "from" => "catch_up")
            .increment(1);
        self.remember(aggregate_id, state.clone(), version);
        EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: state,
            current_sequence: version,
            current_snapshot: None,
        }
    }

    /// Each aggregate of `ids` (distinct), read just now, in their order: the remembered copies brought up to date
    /// with one read of the events after each (one statement on Postgres, whatever their number), the others read
    /// whole, as is a copy whose last event the store no longer holds.
    pub(crate) async fn load_caught_up_many(
        &self,
        ids: &[String],
    ) -> Result<Vec<EventStoreAggregateContext<A>>, AggregateError<A::Error>>
    where
        R: CatchUpMany,
    {
        let copies: Vec<Option<Remembered<A>>> = ids.iter().map(|id| self.remembered(id)).collect();
        let after: Vec<(String, usize)> = ids
            .iter()
            .zip(&copies)
            .filter_map(|(id, copy)| {
                copy.as_ref()
                    .map(|copy| (id.clone(), copy.version.saturating_sub(1)))
            })
            .collect();
        let mut events: HashMap<String, Vec<SerializedEvent>> = HashMap::new();
        if !after.is_empty() {
            count_catch_up_read::<A>();
            for event in self
                .shared
                .catch_up
                .get_events_after_each::<A>(&after)
                .await?
            {
                events
                    .entry(event.aggregate_id.clone())
                    .or_default()
                    .push(event);
            }
        }
        let mut loaded = Vec::with_capacity(ids.len());
        for (id, copy) in ids.iter().zip(copies) {
            let caught_up = match copy {
                Some(copy) => continue_with(
                    copy.aggregate,
                    copy.version,
                    events.remove(id).unwrap_or_default(),
                )?,
                None => None,
            };
            let context = match caught_up {
                Some(continued) => self.caught_up(id, continued),
                None => self.load_fresh(id).await?,
            };
            loaded.push(context);
        }
        Ok(loaded)
    }

    /// The remembered copy (read whole on a miss, brought up to date when marked stale), and whether it was read
    /// from the database just now (then it is as fresh as a read can be).
    pub(crate) async fn load_read(
        &self,
        aggregate_id: &str,
    ) -> Result<(EventStoreAggregateContext<A>, bool), AggregateError<A::Error>> {
        match self.remembered(aggregate_id) {
            Some(remembered) if remembered.stale => self
                .catch_up(aggregate_id, remembered)
                .await
                .map(|context| (context, true)),
            Some(remembered) => Ok((
                EventStoreAggregateContext {
                    aggregate_id: aggregate_id.to_string(),
                    aggregate: remembered.aggregate,
                    current_sequence: remembered.version,
                    current_snapshot: None,
                },
                false,
            )),
            None => self
                .load_fresh(aggregate_id)
                .await
                .map(|context| (context, true)),
        }
    }

    /// The aggregate from its latest snapshot and the events after it, or from its whole history when it has no
    /// usable snapshot; writes a snapshot when the load replayed more than [`snapshots::SNAPSHOT_EVERY`] events.
    async fn load_from_snapshot(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        // A kind without snapshots (`None`) is read whole, as one with no snapshot yet.
        let snapshot = match &self.shared.snapshots {
            Some(snapshots) => snapshots
                .read::<A>(aggregate_id)
                .await
                .map_err(|error| AggregateError::DatabaseConnectionError(Box::new(error)))?,
            None => None,
        };
        let from_snapshot = match snapshot {
            Some((taken_at, state)) => self.continue_from(aggregate_id, state, taken_at).await?,
            None => None,
        };
        let (state, version, replayed) = match from_snapshot {
            Some(loaded) => {
                metrics::counter!("whist_aggregate_loads_total", "aggregate" => A::TYPE, "from" => "snapshot")
                    .increment(1);
                loaded
            }
            None => self.load_whole_history(aggregate_id).await?,
        };
        if let Some(snapshots) = &self.shared.snapshots {
            if replayed >= snapshots::SNAPSHOT_EVERY {
                snapshots.write(aggregate_id, version, &state);
            }
        }
        Ok(EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: state,
            current_sequence: version,
            current_snapshot: None,
        })
    }

    /// The aggregate replayed from its first event: its state, version, and the events replayed.
    async fn load_whole_history(
        &self,
        aggregate_id: &str,
    ) -> Result<(A, usize, usize), AggregateError<A::Error>> {
        let context = self.shared.inner.load_aggregate(aggregate_id).await?;
        metrics::counter!("whist_aggregate_loads_total", "aggregate" => A::TYPE, "from" => "history")
            .increment(1);
        let version = context.current_sequence;
        Ok((context.aggregate, version, version))
    }

    /// Loads from the database, ignoring and then refreshing the remembered copy.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load_fresh(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        let context = self.load_from_snapshot(aggregate_id).await?;
        if context.current_sequence == 0 && !self.shared.remembers_empty {
            // Nothing is remembered for an id that has no events: anyone can ask about any id, and remembering
            // each would let requests for made-up ids fill the cache and push out the aggregates that matter.
            self.forget(aggregate_id);
        } else {
            self.remember(
                aggregate_id,
                context.aggregate.clone(),
                context.current_sequence,
            );
        }
        Ok(context)
    }
}

impl<R, A> EventStore<A> for CachedEventStore<R, A>
where
    R: PersistedEventRepository,
    A: Aggregate + Clone + Send + Sync,
{
    type AC = EventStoreAggregateContext<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.shared.inner.load_events(aggregate_id).await
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        self.load_read(aggregate_id)
            .await
            .map(|(context, _)| context)
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: EventStoreAggregateContext<A>,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        let aggregate_id = context.aggregate_id.clone();
        let version = context.current_sequence + events.len();
        // The command's events were already applied to the context's aggregate by the event sink.
        let after = context.aggregate.clone();
        match self.shared.inner.commit(events, context, metadata).await {
            Ok(committed) => {
                self.remember(&aggregate_id, after, version);
                Ok(committed)
            }
            Err(AggregateError::AggregateConflict) => {
                self.mark_stale(&aggregate_id, Stale::Conflict);
                Err(AggregateError::AggregateConflict)
            }
            Err(error) => {
                self.forget(&aggregate_id);
                Err(error)
            }
        }
    }
}

/// Carries `state`, known at `version`, on with `events`, the stored events from the one at `version` itself on
/// (all of them at version 0): the state, its version and the events applied, or `None` when the event at
/// `version` is not among them (the log moved back below what `state` folded in: only the whole history tells).
fn continue_with<A: Aggregate>(
    mut state: A,
    version: usize,
    mut events: Vec<SerializedEvent>,
) -> Result<Option<Continued<A>>, AggregateError<A::Error>> {
    if version > 0 {
        match events.first() {
            Some(known) if known.sequence == version => {
                events.remove(0);
            }
            _ => return Ok(None),
        }
    }
    let applied = events.len();
    let version = apply_stored(&mut state, version, events)?;
    Ok(Some((state, version, applied)))
}

/// A copy carried on: its state, its version, and the events applied to get there.
type Continued<A> = (A, usize, usize);

fn count_catch_up_read<A: Aggregate>() {
    metrics::counter!("whist_catch_up_reads_total", "aggregate" => A::TYPE).increment(1);
}

/// A repository that reads the events after the versions of several aggregates of one type in one go.
pub trait CatchUpMany: PersistedEventRepository {
    /// The events of aggregates of `A`'s type after each one's sequence in `after` (distinct ids), each
    /// aggregate's in order of sequence.
    fn get_events_after_each<A: Aggregate>(
        &self,
        after: &[(String, usize)],
    ) -> impl std::future::Future<Output = Result<Vec<SerializedEvent>, PersistenceError>> + Send;
}

/// SQLite runs in the process: one read per aggregate costs no round trip.
impl CatchUpMany for sqlite_es::SqliteEventRepository {
    async fn get_events_after_each<A: Aggregate>(
        &self,
        after: &[(String, usize)],
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let mut events = Vec::new();
        for (aggregate_id, sequence) in after {
            events.extend(self.get_last_events::<A>(aggregate_id, *sequence).await?);
        }
        Ok(events)
    }
}

/// Applies stored events (upcast first) to `state`, which stands at `version`; the version after the last.
fn apply_stored<A: Aggregate>(
    state: &mut A,
    version: usize,
    events: impl IntoIterator<Item = SerializedEvent>,
) -> Result<usize, AggregateError<A::Error>> {
    let mut version = version;
    for event in events {
        let event = DomainUpcaster.upcast_if_needed(event);
        let payload: A::Event = serde_json::from_value(event.payload)
            .map_err(|error| AggregateError::DeserializationError(Box::new(error)))?;
        state.apply(payload);
        version = event.sequence;
    }
    Ok(version)
}

/// The domain's upcasters (`whist_domain::versions`), as cqrs-es calls them when it loads an aggregate.
struct DomainUpcaster;

impl DomainUpcaster {
    fn upcast_if_needed(&self, event: SerializedEvent) -> SerializedEvent {
        if self.can_upcast(&event.event_type, &event.event_version) {
            self.upcast(event)
        } else {
            event
        }
    }
}

impl EventUpcaster for DomainUpcaster {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        whist_domain::versions::needs_upcast(event_type, event_version)
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        match whist_domain::versions::upcast(
            &event.event_type,
            &event.event_version,
            event.payload.clone(),
        ) {
            Ok((version, payload)) => {
                event.event_version = version;
                event.payload = payload;
            }
            // Left as stored: reading it as the current shape then fails with the deserialisation error.
            Err(error) => tracing::error!(error = %error, "an old event could not be upcast"),
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::{state_bytes, CopyWeight, RecentlyFollowed, Remembered};
    use whist_domain::probe::Probe;

    #[test]
    fn a_copy_is_behind_a_followed_event_until_that_event_is_forgotten_among_newer_ones() {
        let mut followed = RecentlyFollowed::default();
        followed.saw("a", 3);
        followed.saw("a", 2);
        assert!(followed.newer_than("a", 2), "sequence 3 was followed");
        assert!(!followed.newer_than("a", 3));
        assert!(!followed.newer_than("b", 0), "nothing followed of b");
        for other in 0..RecentlyFollowed::KEPT {
            followed.saw(&format!("other-{other}"), 1);
        }
        assert!(
            !followed.newer_than("a", 0),
            "forgotten after KEPT newer aggregates"
        );
        assert_eq!(followed.highest.len(), RecentlyFollowed::KEPT);
        assert_eq!(followed.order.len(), RecentlyFollowed::KEPT);
    }

    fn cache(
        entries: usize,
        bytes: u64,
    ) -> quick_cache::sync::Cache<String, Remembered<Probe>, CopyWeight> {
        quick_cache::sync::Cache::with_weighter(
            entries,
            bytes,
            CopyWeight {
                floor: bytes / entries as u64,
            },
        )
    }

    fn copy(total: u64, padding: u64) -> Remembered<Probe> {
        let aggregate = Probe {
            increments: 1,
            total,
        };
        Remembered {
            bytes: state_bytes(&aggregate) + padding,
            aggregate,
            version: 1,
            stale: false,
        }
    }

    #[test]
    fn remembered_copies_are_bounded_by_their_number() {
        let cache = cache(100, 1 << 20);
        for index in 0..10_000 {
            cache.insert(format!("probe-{index}"), copy(index, 0));
        }
        assert!(cache.len() <= 100, "{} copies", cache.len());
        assert!(
            cache.len() >= 50,
            "the cache still remembers: {}",
            cache.len()
        );
    }

    #[test]
    fn remembered_copies_are_bounded_by_their_bytes() {
        let cache = cache(100_000, 1 << 20);
        for index in 0..1_000 {
            // Copies of about 64 KiB each: 16 fit in a MiB.
            cache.insert(format!("probe-{index}"), copy(index, 64 << 10));
        }
        assert!(cache.weight() <= 1 << 20, "{} bytes", cache.weight());
        assert!(cache.len() <= 16, "{} copies", cache.len());
    }
}
