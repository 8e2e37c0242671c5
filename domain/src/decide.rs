//! The shape of every aggregate: a synchronous, pure [`Decide`] (state and command in, events or a typed refusal
//! out; and how each event changes the state), adapted to cqrs-es's `Aggregate` by [`crate::cqrs_aggregate!`], and
//! the stored name and version of each event, declared once by [`crate::stored_events!`].
//!
//! With cqrs-es 0.5 an aggregate's `handle` writes its events to a sink, which applies each at once; the adapter
//! does exactly that with the events `decide` returned, so no aggregate writes `handle`, and a decision can be
//! tested, or composed with others, without a sink.

/// A pure decision-maker.
pub trait Decide {
    type Command;
    type Event;
    /// A refusal: a business rule, stable and safe to show.
    type Error: std::error::Error;

    /// The events `command` leads to on this state (none when it changes nothing), or why it is refused.
    ///
    /// # Errors
    /// A business rule refuses the command.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// The state after `event`. Total: a stored event is a fact, and every fact can be applied.
    fn evolve(&mut self, event: Self::Event);

    /// Whether this state is settled: every command that it refuses, or on which it decides nothing, is refused
    /// or decides nothing alike on every later state of the aggregate (an ended mandelbox stays ended whatever is
    /// reported of it). Such a decision, taken on a copy that may be behind the store, is then final without a
    /// read of the store: no event it may have missed can change it. `false` unless the aggregate says otherwise;
    /// a wrong `true` would make a stale refusal final, so each `true` is tested against every later event
    /// ([`settles_for`]).
    fn is_settled(&self) -> bool {
        false
    }

    /// The most events one aggregate of this kind can ever have, when its rules bound its life (a mandelbox: six);
    /// `None` when they do not. The store reads no snapshot for a kind bounded below its snapshot interval, so
    /// each bound is tested against random histories ([`most_events_in`]).
    const MOST_EVENTS: Option<usize> = None;
}

/// What the store asks of an aggregate's life, for code that knows it only as cqrs-es's `Aggregate` (whose
/// associated types share `Decide`'s names): [`Decide::is_settled`] (whether a decision on a copy that may be
/// behind is final) and [`Decide::MOST_EVENTS`].
pub trait Lifecycle {
    fn is_settled(&self) -> bool;
    fn most_events() -> Option<usize>;
}

impl<D: Decide> Lifecycle for D {
    fn is_settled(&self) -> bool {
        Decide::is_settled(self)
    }

    fn most_events() -> Option<usize> {
        D::MOST_EVENTS
    }
}

/// The events a history of `commands` records, each decided on the state the ones before it left (refusals
/// skipped): what a bound in [`Decide::MOST_EVENTS`] is tested against.
#[cfg(test)]
pub(crate) fn most_events_in<D>(commands: impl IntoIterator<Item = D::Command>) -> usize
where
    D: Decide + Default,
    D::Event: Clone,
{
    let mut state = D::default();
    let mut recorded = 0;
    for command in commands {
        if let Ok(events) = state.decide(command) {
            for event in events {
                state.evolve(event);
                recorded += 1;
            }
        }
    }
    recorded
}

/// Whether `state` decides each of `commands` as every later state does, for the commands it refuses or on which
/// it decides nothing: the later states are `state` after each of `later` in turn. The property
/// [`Decide::is_settled`] promises, for tests.
#[cfg(test)]
pub(crate) fn settles_for<D>(state: &D, commands: &[D::Command], later: &[D::Event]) -> bool
where
    D: Decide + Clone,
    D::Command: Clone,
    D::Event: Clone + PartialEq + std::fmt::Debug,
{
    let outcome = |state: &D, command: &D::Command| match state.decide(command.clone()) {
        Ok(events) if events.is_empty() => Some("nothing".to_string()),
        Ok(_) => None,
        Err(refusal) => Some(refusal.to_string()),
    };
    let mut after = state.clone();
    let mut states = vec![state.clone()];
    for event in later {
        after.evolve(event.clone());
        states.push(after.clone());
    }
    commands
        .iter()
        .all(|command| match outcome(state, command) {
            None => true,
            Some(first) => states
                .iter()
                .all(|later| outcome(later, command).as_deref() == Some(first.as_str())),
        })
}

/// The events `commands` lead to, each decided on the state the ones before it left (as the event sink applies
/// them), or the first refusal.
///
/// # Errors
/// A business rule refuses one of the commands.
pub fn decide_in_turn<D>(
    state: &D,
    commands: impl IntoIterator<Item = D::Command>,
) -> Result<Vec<D::Event>, D::Error>
where
    D: Decide + Clone,
    D::Event: Clone,
{
    let mut after = state.clone();
    let mut events = Vec::new();
    for command in commands {
        for event in after.decide(command)? {
            after.evolve(event.clone());
            events.push(event);
        }
    }
    Ok(events)
}

/// A state built from `events`, as the store builds it from an aggregate's history (for tests and for
/// decisions that need the state after a decision's own events).
pub fn state_from<D: Decide + Default>(events: impl IntoIterator<Item = D::Event>) -> D {
    let mut state = D::default();
    for event in events {
        state.evolve(event);
    }
    state
}

/// Whether the state after `events` is the same when rebuilt from a snapshot taken after the first `cut` of them
/// (the state serialised and read back, as the store keeps snapshots) and the events after it: the property every
/// aggregate's snapshots rely on. The two states compared as they serialise.
#[cfg(test)]
pub(crate) fn resumes_from_a_snapshot<D>(events: &[D::Event], cut: usize) -> bool
where
    D: Decide + Default + serde::Serialize + serde::de::DeserializeOwned,
    D::Event: Clone,
{
    let cut = cut.min(events.len());
    let whole: D = state_from(events.iter().cloned());
    let taken: D = state_from(events[..cut].iter().cloned());
    let Ok(stored) = serde_json::to_string(&taken) else {
        return false;
    };
    let Ok(mut resumed) = serde_json::from_str::<D>(&stored) else {
        return false;
    };
    for event in &events[cut..] {
        resumed.evolve(event.clone());
    }
    serde_json::to_value(&resumed).ok() == serde_json::to_value(&whole).ok()
}

/// The stored names and versions of an event type, in declaration order.
pub trait StoredEvents {
    /// `(event_type, event_version)` of every variant.
    const STORED: &'static [(&'static str, &'static str)];
}

/// Implements cqrs-es's `Aggregate` for a type that implements [`Decide`]: `handle` writes the decided events to
/// the sink (which applies each at once), `apply` is [`Decide::evolve`].
#[macro_export]
macro_rules! cqrs_aggregate {
    ($aggregate:ty, $name:literal) => {
        impl cqrs_es::Aggregate for $aggregate {
            const TYPE: &'static str = $name;
            type Command = <$aggregate as $crate::decide::Decide>::Command;
            type Event = <$aggregate as $crate::decide::Decide>::Event;
            type Error = <$aggregate as $crate::decide::Decide>::Error;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _services: &Self::Services,
                sink: &cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                for event in $crate::decide::Decide::decide(self, command)? {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                $crate::decide::Decide::evolve(self, event)
            }
        }
    };
}

/// Implements `DomainEvent` (and [`StoredEvents`]) for an event enum whose stored names are the prefix followed by
/// the variant's name, each at version `1.0` unless another is given (`Variant = VERSION`).
#[macro_export]
macro_rules! stored_events {
    ($event:ty, $prefix:literal, [$($variant:ident $(= $version:expr)?),+ $(,)?]) => {
        impl cqrs_es::DomainEvent for $event {
            fn event_type(&self) -> String {
                match self {
                    $(Self::$variant { .. } => concat!($prefix, stringify!($variant)),)+
                }
                .to_string()
            }

            fn event_version(&self) -> String {
                match self {
                    $(Self::$variant { .. } => $crate::stored_events!(@version $($version)?),)+
                }
                .to_string()
            }
        }

        impl $crate::decide::StoredEvents for $event {
            const STORED: &'static [(&'static str, &'static str)] = &[
                $((concat!($prefix, stringify!($variant)), $crate::stored_events!(@version $($version)?)),)+
            ];
        }
    };
    (@version) => {
        "1.0"
    };
    (@version $version:expr) => {
        $version
    };
}

#[cfg(test)]
mod tests {
    /// Every event name and version the log holds. A rename or a version change orphans stored history unless it
    /// comes with an upcaster: this list changes only together with `crate::versions`.
    #[test]
    fn every_stored_event_name_and_version_is_pinned() {
        let stored: Vec<(&str, &str)> = crate::versions::current_events().collect();
        assert_eq!(
            stored,
            [
                ("AssignKeyAnswered", "1.0"),
                ("ImageReleaseActivated", "1.0"),
                ("ImageReleasePrepared", "1.0"),
                ("ImageReleaseSwappedOver", "1.0"),
                ("ImageReleaseRolledBack", "1.0"),
                ("InstanceLaunchRequested", "2.0"),
                ("InstanceLaunched", "1.0"),
                ("InstanceLaunchFailed", "1.0"),
                ("InstanceRegistered", "1.0"),
                ("InstanceMandelboxAllocated", "1.0"),
                ("InstanceMandelboxFreed", "1.0"),
                ("InstanceDrainStarted", "1.0"),
                ("InstanceBecameUnresponsive", "1.0"),
                ("InstanceBecameResponsive", "1.0"),
                ("InstanceTerminationStarted", "1.0"),
                ("InstanceTerminated", "1.0"),
                ("InstanceStrayTerminated", "1.0"),
                ("LeadershipTaken", "1.0"),
                ("LeadershipDecided", "1.0"),
                ("MandelboxAllocated", "1.0"),
                ("MandelboxStatusChanged", "1.0"),
                ("MandelboxEnded", "1.0"),
                ("MandelboxSpunUp", "1.0"),
                ("ProbeIncremented", "1.0"),
                ("ProbeDecremented", "1.0"),
                ("ServiceMaintenanceStarted", "1.0"),
                ("ServiceMaintenanceEnded", "1.0"),
                ("SessionRequested", "1.0"),
                ("SessionAssigned", "1.0"),
                ("SessionRefused", "1.0"),
                ("SessionConnected", "1.0"),
                ("SessionEnded", "1.0"),
                ("SubscriptionCustomerLinked", "1.0"),
                ("SubscriptionStatusChanged", "1.0"),
                ("SubscriptionStaleFactIgnored", "1.0"),
                ("StripeCustomerLinked", "1.0"),
                ("StripeCustomerFactHeld", "1.0"),
                ("UserMandelboxReserved", "1.0"),
                ("UserMandelboxReleased", "1.0"),
            ]
        );
    }
}
