//! Subscriptions: what Stripe told us about each user's subscription, and whether the user is entitled to service.
//!
//! Two aggregates:
//! - `Subscription` (id: the user id): the Stripe customer linked to the user, every subscription status Stripe
//!   reported, in Stripe's own order, and from that the entitlement (`active` or `trialing`).
//! - `StripeCustomer` (id: the Stripe customer id): which user the customer belongs to, so that a webhook naming only
//!   the customer finds its user without reading a lagging read model; a fact about a customer not linked yet is held
//!   here until the link arrives (Stripe does not promise to deliver `checkout.session.completed` first).
//!
//! Stripe delivers events at least once and in any order. An event id seen before changes nothing. A fact older than
//! the one the state rests on (by the Stripe event's `created` time, then by the kind of event: a deletion outranks an
//! update, an update a creation) is recorded as ignored and changes nothing else.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Which subscription webhook a fact came from; at equal `created` times a later kind outranks an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FactKind {
    Created,
    Updated,
    Deleted,
}

impl FactKind {
    /// The kind for a Stripe event type, if it is one of the subscription events.
    pub fn from_event_type(event_type: &str) -> Option<Self> {
        match event_type {
            "customer.subscription.created" => Some(Self::Created),
            "customer.subscription.updated" => Some(Self::Updated),
            "customer.subscription.deleted" => Some(Self::Deleted),
            _ => None,
        }
    }
}

/// One subscription event from Stripe, reduced to the fields the decisions need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionFact {
    /// The Stripe event id (`evt_…`): the idempotency key.
    pub event_id: String,
    pub kind: FactKind,
    /// The Stripe event's `created` (Unix seconds): Stripe's own order of events.
    pub created: i64,
    pub subscription_id: String,
    pub customer_id: String,
    /// The subscription's `status` as Stripe spells it (`active`, `trialing`, `past_due`, `canceled`, …).
    pub status: String,
}

impl SubscriptionFact {
    fn order(&self) -> (i64, FactKind) {
        (self.created, self.kind)
    }
}

/// Whether a Stripe subscription status grants service.
pub fn status_grants_service(status: &str) -> bool {
    matches!(status, "active" | "trialing")
}

/// A user's subscription as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub customer_id: Option<String>,
    pub subscription_id: Option<String>,
    pub status: Option<String>,
    /// The order key (`created`, kind) of the fact the status rests on.
    pub status_order: Option<(i64, FactKind)>,
    /// Whether the user ever had a subscription (then Checkout offers no trial).
    pub ever_subscribed: bool,
    /// Stripe event ids already recorded.
    pub seen_events: BTreeSet<String>,
}

impl Subscription {
    /// Whether the user may be served.
    pub fn is_entitled(&self) -> bool {
        self.status.as_deref().is_some_and(status_grants_service)
    }
}

/// Commands a user's subscription takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionCommand {
    /// Link the Stripe customer to the user (when we create the customer, or when Checkout completes). Linking the
    /// same customer again changes nothing; a different customer replaces the link.
    LinkCustomer {
        customer_id: String,
        /// The Stripe event that reported the link, if any (`checkout.session.completed`).
        event_id: Option<String>,
        at: DateTime<Utc>,
    },
    /// Record a subscription fact from Stripe.
    RecordFact {
        fact: SubscriptionFact,
        at: DateTime<Utc>,
    },
}

/// Events of a user's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubscriptionEvent {
    CustomerLinked {
        customer_id: String,
        event_id: Option<String>,
        at: DateTime<Utc>,
    },
    StatusChanged {
        fact: SubscriptionFact,
        previous_status: Option<String>,
        entitled: bool,
        at: DateTime<Utc>,
    },
    /// A fact older than the current state: kept for the record, changes nothing else.
    StaleFactIgnored {
        fact: SubscriptionFact,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(
    SubscriptionEvent,
    "Subscription",
    [CustomerLinked, StatusChanged, StaleFactIgnored]
);

/// Why a subscription refused a command. None so far: every Stripe fact is either recorded or ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error("the Stripe event names no subscription or customer")]
    IncompleteFact,
}

impl crate::decide::Decide for Subscription {
    type Command = SubscriptionCommand;
    type Event = SubscriptionEvent;
    type Error = SubscriptionError;

    fn decide(
        &self,
        command: SubscriptionCommand,
    ) -> Result<Vec<SubscriptionEvent>, SubscriptionError> {
        match command {
            SubscriptionCommand::LinkCustomer {
                customer_id,
                event_id,
                at,
            } => {
                if let Some(event_id) = &event_id {
                    if self.seen_events.contains(event_id) {
                        return Ok(vec![]);
                    }
                }
                if self.customer_id.as_deref() == Some(customer_id.as_str()) {
                    return Ok(vec![]);
                }
                Ok(vec![SubscriptionEvent::CustomerLinked {
                    customer_id,
                    event_id,
                    at,
                }])
            }
            SubscriptionCommand::RecordFact { fact, at } => {
                if fact.subscription_id.is_empty() || fact.customer_id.is_empty() {
                    return Err(SubscriptionError::IncompleteFact);
                }
                if self.seen_events.contains(&fact.event_id) {
                    return Ok(vec![]);
                }
                if self
                    .status_order
                    .is_some_and(|current| fact.order() < current)
                {
                    return Ok(vec![SubscriptionEvent::StaleFactIgnored { fact, at }]);
                }
                Ok(vec![SubscriptionEvent::StatusChanged {
                    previous_status: self.status.clone(),
                    entitled: status_grants_service(&fact.status),
                    fact,
                    at,
                }])
            }
        }
    }

    fn evolve(&mut self, event: SubscriptionEvent) {
        match event {
            SubscriptionEvent::CustomerLinked {
                customer_id,
                event_id,
                ..
            } => {
                self.customer_id = Some(customer_id);
                self.seen_events.extend(event_id);
            }
            SubscriptionEvent::StatusChanged { fact, .. } => {
                self.status_order = Some(fact.order());
                self.status = Some(fact.status);
                self.subscription_id = Some(fact.subscription_id);
                self.ever_subscribed = true;
                self.seen_events.insert(fact.event_id);
            }
            SubscriptionEvent::StaleFactIgnored { fact, .. } => {
                self.ever_subscribed = true;
                self.seen_events.insert(fact.event_id);
            }
        }
    }
}

crate::cqrs_aggregate!(Subscription, "subscription");

/// A Stripe customer as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeCustomer {
    pub user_id: Option<String>,
    /// Facts that arrived before the customer was linked, newest per subscription order; handed to the user's
    /// subscription when the link arrives.
    pub held: Vec<SubscriptionFact>,
}

/// Commands a Stripe customer takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeCustomerCommand {
    /// The customer belongs to `user_id`. Linking to the same user again changes nothing.
    Link { user_id: String, at: DateTime<Utc> },
    /// Keep a fact about a customer not linked to a user yet. The same event twice changes nothing.
    Hold {
        fact: SubscriptionFact,
        at: DateTime<Utc>,
    },
}

/// Events of a Stripe customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StripeCustomerEvent {
    Linked {
        user_id: String,
        at: DateTime<Utc>,
    },
    FactHeld {
        fact: SubscriptionFact,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(StripeCustomerEvent, "StripeCustomer", [Linked, FactHeld]);

/// Why a Stripe customer refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeCustomerError {
    /// A customer belongs to one user for good; a second user claiming it is refused.
    #[error("the Stripe customer already belongs to another user")]
    LinkedToAnotherUser,
    /// Facts are held only until the link: afterwards they go to the user's subscription.
    #[error("the Stripe customer is linked; its facts go to the user's subscription")]
    AlreadyLinked,
}

impl crate::decide::Decide for StripeCustomer {
    type Command = StripeCustomerCommand;
    type Event = StripeCustomerEvent;
    type Error = StripeCustomerError;

    fn decide(
        &self,
        command: StripeCustomerCommand,
    ) -> Result<Vec<StripeCustomerEvent>, StripeCustomerError> {
        match command {
            StripeCustomerCommand::Link { user_id, at } => match &self.user_id {
                Some(linked) if *linked == user_id => Ok(vec![]),
                Some(_) => Err(StripeCustomerError::LinkedToAnotherUser),
                None => Ok(vec![StripeCustomerEvent::Linked { user_id, at }]),
            },
            StripeCustomerCommand::Hold { fact, at } => {
                if self.user_id.is_some() {
                    return Err(StripeCustomerError::AlreadyLinked);
                }
                if self.held.iter().any(|held| held.event_id == fact.event_id) {
                    return Ok(vec![]);
                }
                Ok(vec![StripeCustomerEvent::FactHeld { fact, at }])
            }
        }
    }

    fn evolve(&mut self, event: StripeCustomerEvent) {
        match event {
            StripeCustomerEvent::Linked { user_id, .. } => self.user_id = Some(user_id),
            StripeCustomerEvent::FactHeld { fact, .. } => self.held.push(fact),
        }
    }
}

crate::cqrs_aggregate!(StripeCustomer, "stripe_customer");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Decide as _;
    use cqrs_es::test::TestFramework;
    use cqrs_es::Aggregate as _;
    use proptest::prelude::*;

    type SubscriptionTest = TestFramework<Subscription>;
    type CustomerTest = TestFramework<StripeCustomer>;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn fact(event_id: &str, kind: FactKind, created: i64, status: &str) -> SubscriptionFact {
        SubscriptionFact {
            event_id: event_id.to_string(),
            kind,
            created,
            subscription_id: "sub_1".to_string(),
            customer_id: "cus_1".to_string(),
            status: status.to_string(),
        }
    }

    /// One subscription's facts, created with the first status and updated with each next one, a second apart.
    fn history_of(statuses: &[&str]) -> Vec<SubscriptionFact> {
        statuses
            .iter()
            .enumerate()
            .map(|(index, status)| {
                let kind = if index == 0 {
                    FactKind::Created
                } else {
                    FactKind::Updated
                };
                fact(&format!("evt_{index}"), kind, 100 + index as i64, status)
            })
            .collect()
    }

    fn changed(fact: SubscriptionFact, previous: Option<&str>) -> SubscriptionEvent {
        SubscriptionEvent::StatusChanged {
            entitled: status_grants_service(&fact.status),
            fact,
            previous_status: previous.map(str::to_string),
            at: at(),
        }
    }

    fn record(fact: SubscriptionFact) -> SubscriptionCommand {
        SubscriptionCommand::RecordFact { fact, at: at() }
    }

    #[test]
    fn an_active_subscription_entitles_the_user() {
        let active = fact("evt_1", FactKind::Created, 100, "active");
        SubscriptionTest::with(())
            .given_no_previous_events()
            .when(record(active.clone()))
            .then_expect_events(vec![changed(active, None)]);
    }

    #[test]
    fn a_stripe_event_seen_before_changes_nothing() {
        let active = fact("evt_1", FactKind::Created, 100, "active");
        SubscriptionTest::with(())
            .given(vec![changed(active.clone(), None)])
            .when(record(active))
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_older_fact_arriving_late_is_recorded_as_ignored() {
        let updated = fact("evt_2", FactKind::Updated, 200, "canceled");
        let created = fact("evt_1", FactKind::Created, 100, "active");
        SubscriptionTest::with(())
            .given(vec![changed(updated, None)])
            .when(record(created.clone()))
            .then_expect_events(vec![SubscriptionEvent::StaleFactIgnored {
                fact: created,
                at: at(),
            }]);
    }

    #[test]
    fn at_the_same_second_an_update_outranks_a_creation() {
        let updated = fact("evt_2", FactKind::Updated, 100, "active");
        let created = fact("evt_1", FactKind::Created, 100, "incomplete");
        SubscriptionTest::with(())
            .given(vec![changed(updated, None)])
            .when(record(created.clone()))
            .then_expect_events(vec![SubscriptionEvent::StaleFactIgnored {
                fact: created,
                at: at(),
            }]);
    }

    #[test]
    fn a_deleted_subscription_ends_the_entitlement() {
        let created = fact("evt_1", FactKind::Created, 100, "active");
        let deleted = fact("evt_2", FactKind::Deleted, 300, "canceled");
        SubscriptionTest::with(())
            .given(vec![changed(created, None)])
            .when(record(deleted.clone()))
            .then_expect_events(vec![changed(deleted, Some("active"))]);
    }

    #[test]
    fn a_fact_without_a_subscription_is_refused() {
        let mut incomplete = fact("evt_1", FactKind::Created, 100, "active");
        incomplete.subscription_id.clear();
        SubscriptionTest::with(())
            .given_no_previous_events()
            .when(record(incomplete))
            .then_expect_error(SubscriptionError::IncompleteFact);
    }

    #[test]
    fn linking_the_same_customer_twice_changes_nothing() {
        SubscriptionTest::with(())
            .given(vec![SubscriptionEvent::CustomerLinked {
                customer_id: "cus_1".to_string(),
                event_id: None,
                at: at(),
            }])
            .when(SubscriptionCommand::LinkCustomer {
                customer_id: "cus_1".to_string(),
                event_id: Some("evt_9".to_string()),
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_customer_belongs_to_one_user() {
        CustomerTest::with(())
            .given(vec![StripeCustomerEvent::Linked {
                user_id: "auth0|a".to_string(),
                at: at(),
            }])
            .when(StripeCustomerCommand::Link {
                user_id: "auth0|b".to_string(),
                at: at(),
            })
            .then_expect_error(StripeCustomerError::LinkedToAnotherUser);
    }

    #[test]
    fn a_fact_about_an_unlinked_customer_is_held_once() {
        let active = fact("evt_1", FactKind::Created, 100, "active");
        CustomerTest::with(())
            .given(vec![StripeCustomerEvent::FactHeld {
                fact: active.clone(),
                at: at(),
            }])
            .when(StripeCustomerCommand::Hold {
                fact: active,
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    fn apply_all(facts: &[SubscriptionFact]) -> Subscription {
        let mut subscription = Subscription::default();
        for fact in facts {
            let events = subscription
                .decide(record(fact.clone()))
                .expect("complete facts are never refused");
            for event in events {
                subscription.apply(event);
            }
        }
        subscription
    }

    proptest! {
        /// Whatever facts Stripe delivered, in whatever order, the state reads the same from a snapshot taken at any
        /// point and the events after it.
        #[test]
        fn any_history_reads_the_same_from_a_snapshot_and_the_events_after_it(
            statuses in proptest::collection::vec(
                prop_oneof![Just("active"), Just("trialing"), Just("past_due"), Just("canceled")], 1..8),
            order in any::<proptest::sample::Index>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut facts = history_of(&statuses);
            let rotation = order.index(facts.len());
            facts.rotate_left(rotation);
            let mut subscription = Subscription::default();
            let mut events = Vec::new();
            for fact in facts {
                for event in subscription.decide(record(fact)).expect("complete facts are never refused") {
                    subscription.apply(event.clone());
                    events.push(event);
                }
            }
            let cut = cut.index(events.len() + 1);
            prop_assert!(crate::decide::resumes_from_a_snapshot::<Subscription>(&events, cut));
        }

        /// Whatever order Stripe delivers a history in, and however often it repeats events, the state ends on the
        /// newest fact.
        #[test]
        fn any_delivery_order_ends_in_the_newest_state(
            statuses in proptest::collection::vec(
                prop_oneof![Just("active"), Just("trialing"), Just("past_due"), Just("canceled")], 1..8),
            order in any::<proptest::sample::Index>(),
            repeats in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
        ) {
            let history = history_of(&statuses);
            let mut delivered = history.clone();
            let rotation = order.index(delivered.len());
            delivered.rotate_left(rotation);
            for repeat in &repeats {
                delivered.push(history[repeat.index(history.len())].clone());
            }
            let state = apply_all(&delivered);
            let newest = history.last().expect("at least one fact");
            prop_assert_eq!(state.status.as_deref(), Some(newest.status.as_str()));
            prop_assert_eq!(state.is_entitled(), status_grants_service(&newest.status));
            prop_assert_eq!(state.seen_events.len(), history.len());
        }
    }
}
