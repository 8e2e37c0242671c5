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
use std::sync::{Arc, Mutex};

use cqrs_es::persist::{
    EventStoreAggregateContext, EventUpcaster, PersistedEventRepository, PersistedEventStore,
    SerializedEvent,
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
    cache: Mutex<HashMap<String, Remembered<A>>>,
    capacity: usize,
    snapshots: Snapshots,
}

/// A remembered aggregate; `stale` when it may be behind the store (it is brought up to date before its next use),
/// `conflicted` after an append decided on it collided: the store then holds an event after `version`, and a
/// catch-up that finds none means the copy is ahead of the store (the log moved back), not behind it.
#[derive(Clone)]
struct Remembered<A> {
    aggregate: A,
    version: usize,
    stale: bool,
    conflicted: bool,
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
    /// A store over `repository` that remembers up to `capacity` aggregates; `catch_up` reads the events a stale
    /// copy misses (and those after a snapshot); `snapshots` holds the aggregates' snapshots.
    pub(crate) fn new(repository: R, catch_up: R, capacity: usize, snapshots: Snapshots) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner: PersistedEventStore::new_event_store(repository)
                    .with_upcasters(vec![Box::new(DomainUpcaster)]),
                catch_up,
                cache: Mutex::new(HashMap::new()),
                capacity,
                snapshots,
            }),
        }
    }

    /// Remembers `aggregate` as a commit left it, from version `before` to `after`, and writes a snapshot when the
    /// commit crossed a snapshot point.
    pub(crate) fn committed(&self, aggregate_id: &str, aggregate: A, before: usize, after: usize) {
        if snapshots::due(before, after) {
            self.shared.snapshots.write(aggregate_id, after, &aggregate);
        }
        self.remember(aggregate_id, aggregate, after);
    }

    fn remembered(&self, aggregate_id: &str) -> Option<Remembered<A>> {
        self.shared
            .cache
            .lock()
            .ok()
            .and_then(|cache| cache.get(aggregate_id).cloned())
    }

    /// Whether a copy of the aggregate is remembered (up to date or stale).
    pub(crate) fn is_remembered(&self, aggregate_id: &str) -> bool {
        self.shared
            .cache
            .lock()
            .is_ok_and(|cache| cache.contains_key(aggregate_id))
    }

    /// Remembers that the aggregate has events this process has not read (it was presumed new and was not): the
    /// next command reads its whole history, through the catch-up from version 0.
    pub(crate) fn remember_unread(&self, aggregate_id: &str) {
        self.remember(aggregate_id, A::default(), 0);
        self.mark_stale(aggregate_id);
    }

    /// Remembers `aggregate` at `version`, as committed.
    pub(crate) fn remember(&self, aggregate_id: &str, aggregate: A, version: usize) {
        if let Ok(mut cache) = self.shared.cache.lock() {
            if cache.len() >= self.shared.capacity && !cache.contains_key(aggregate_id) {
                // Forget an arbitrary entry: the cache is an optimisation, any entry may go.
                if let Some(victim) = cache.keys().next().cloned() {
                    cache.remove(&victim);
                }
            }
            cache.insert(
                aggregate_id.to_string(),
                Remembered {
                    aggregate,
                    version,
                    stale: false,
                    conflicted: false,
                },
            );
        }
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
                if let Ok(mut cache) = shared.cache.lock() {
                    cache.clear();
                }
            }
        }
    }

    /// Marks a remembered copy as behind the store because an append decided on it collided: the next command
    /// first reads what it missed, and reads the aggregate whole should there be nothing after its version.
    pub fn mark_conflicted(&self, aggregate_id: &str) {
        if let Ok(mut cache) = self.shared.cache.lock() {
            if let Some(remembered) = cache.get_mut(aggregate_id) {
                remembered.stale = true;
                remembered.conflicted = true;
            }
        }
    }

    /// Forgets one aggregate, so that the next command loads it whole.
    pub fn forget(&self, aggregate_id: &str) {
        if let Ok(mut cache) = self.shared.cache.lock() {
            cache.remove(aggregate_id);
        }
    }

    /// Marks a remembered copy as behind the store, so that the next command first reads what it missed.
    pub fn mark_stale(&self, aggregate_id: &str) {
        if let Ok(mut cache) = self.shared.cache.lock() {
            if let Some(remembered) = cache.get_mut(aggregate_id) {
                remembered.stale = true;
            }
        }
    }

    /// Brings a stale copy up to date with the events after its version (one small read instead of the whole
    /// history), upcast as a full load would.
    async fn catch_up(
        &self,
        aggregate_id: &str,
        mut remembered: Remembered<A>,
    ) -> Result<EventStoreAggregateContext<A>, AggregateError<A::Error>> {
        let events = self
            .shared
            .catch_up
            .get_last_events::<A>(aggregate_id, remembered.version)
            .await?;
        if events.is_empty() && remembered.conflicted {
            // An append after this version collided, yet the store has nothing after it: the copy holds events
            // the store lost (the log moved back). Only the whole history tells what the aggregate is now.
            return self.load_fresh(aggregate_id).await;
        }
        // Events another process appended since this copy was remembered: how stale copies of each type run.
        metrics::counter!("whist_catch_up_events_total", "aggregate" => A::TYPE)
            .increment(events.len() as u64);
        remembered.version = apply_stored(&mut remembered.aggregate, remembered.version, events)?;
        self.remember(
            aggregate_id,
            remembered.aggregate.clone(),
            remembered.version,
        );
        Ok(EventStoreAggregateContext {
            aggregate_id: aggregate_id.to_string(),
            aggregate: remembered.aggregate,
            current_sequence: remembered.version,
            current_snapshot: None,
        })
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
        let snapshot = self
            .shared
            .snapshots
            .read::<A>(aggregate_id)
            .await
            .map_err(|error| AggregateError::DatabaseConnectionError(Box::new(error)))?;
        let (state, version, replayed) = match snapshot {
            Some((taken_at, state)) => {
                // The events from the snapshot's own on: the first must be the one it was taken at, or the store
                // no longer holds what the snapshot folded in (it was restored to an earlier state).
                let events = self
                    .shared
                    .catch_up
                    .get_last_events::<A>(aggregate_id, taken_at - 1)
                    .await?;
                match events.first() {
                    Some(first) if first.sequence == taken_at => {
                        let mut state = state;
                        let replayed = events.len() - 1;
                        let version =
                            apply_stored(&mut state, taken_at, events.into_iter().skip(1))?;
                        metrics::counter!("whist_aggregate_loads_total", "aggregate" => A::TYPE, "from" => "snapshot")
                            .increment(1);
                        (state, version, replayed)
                    }
                    _ => self.load_whole_history(aggregate_id).await?,
                }
            }
            None => self.load_whole_history(aggregate_id).await?,
        };
        if replayed >= snapshots::SNAPSHOT_EVERY {
            self.shared.snapshots.write(aggregate_id, version, &state);
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
        if context.current_sequence == 0 {
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
                self.mark_conflicted(&aggregate_id);
                Err(AggregateError::AggregateConflict)
            }
            Err(error) => {
                self.forget(&aggregate_id);
                Err(error)
            }
        }
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
