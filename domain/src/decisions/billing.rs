//! Billing decisions that span a Stripe customer and a user's subscription: where a verified subscription fact
//! goes, and the link between a customer and a user, which hands the subscription what the customer held.

use chrono::{DateTime, Utc};

use crate::decide::{decide_in_turn, Decide};
use crate::subscription::{
    StripeCustomer, StripeCustomerCommand, StripeCustomerError, StripeCustomerEvent, Subscription,
    SubscriptionCommand, SubscriptionError, SubscriptionEvent, SubscriptionFact,
};

/// Where a subscription fact is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The subscription of the user the customer is linked to.
    Subscription { user_id: String },
    /// The customer, which holds it until it is linked (Checkout's completion may come after the fact).
    Customer,
}

/// A verified subscription fact from Stripe, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactDelivery {
    pub fact: SubscriptionFact,
    pub at: DateTime<Utc>,
}

impl FactDelivery {
    /// The fact goes to the linked user's subscription, or is held on a customer not linked yet.
    pub fn destination(customer: &StripeCustomer) -> Destination {
        match &customer.user_id {
            Some(user_id) => Destination::Subscription {
                user_id: user_id.clone(),
            },
            None => Destination::Customer,
        }
    }

    /// What the linked user's subscription records (a repeated fact: nothing; an older one: that it was ignored).
    ///
    /// # Errors
    /// The fact lacks the subscription or the customer.
    pub fn to_subscription(
        &self,
        subscription: &Subscription,
    ) -> Result<Vec<SubscriptionEvent>, SubscriptionError> {
        subscription.decide(SubscriptionCommand::RecordFact {
            fact: self.fact.clone(),
            at: self.at,
        })
    }

    /// What a customer not linked yet holds.
    ///
    /// # Errors
    /// `AlreadyLinked` when the customer was linked after all (decided on a copy that was behind).
    pub fn hold(
        &self,
        customer: &StripeCustomer,
    ) -> Result<Vec<StripeCustomerEvent>, StripeCustomerError> {
        customer.decide(StripeCustomerCommand::Hold {
            fact: self.fact.clone(),
            at: self.at,
        })
    }
}

/// Linking a Stripe customer to a user (Checkout's completion, or an operator), in both directions at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerLink {
    pub user_id: String,
    pub customer_id: String,
    /// The Stripe event that carried the link, when one did (a repeat of it records nothing).
    pub event_id: Option<String>,
    pub at: DateTime<Utc>,
}

/// What a link records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linked {
    pub customer: Vec<StripeCustomerEvent>,
    /// The link, then every fact the customer held, in the order they arrived.
    pub subscription: Vec<SubscriptionEvent>,
}

/// Why a link was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkRefusal {
    #[error("the Stripe customer already belongs to another user")]
    LinkedToAnotherUser,
    #[error("a fact the customer held was refused: {0}")]
    HeldFactRefused(#[source] SubscriptionError),
}

impl CustomerLink {
    /// Links `customer` to the user and hands `subscription` (the user's) what the customer held. Idempotent.
    ///
    /// # Errors
    /// The customer belongs to another user, or a held fact is refused; nothing is recorded either way.
    pub fn decide(
        &self,
        customer: &StripeCustomer,
        subscription: &Subscription,
    ) -> Result<Linked, LinkRefusal> {
        let customer_events = customer
            .decide(StripeCustomerCommand::Link {
                user_id: self.user_id.clone(),
                at: self.at,
            })
            .map_err(|error| match error {
                StripeCustomerError::LinkedToAnotherUser | StripeCustomerError::AlreadyLinked => {
                    LinkRefusal::LinkedToAnotherUser
                }
            })?;
        let mut commands = vec![SubscriptionCommand::LinkCustomer {
            customer_id: self.customer_id.clone(),
            event_id: self.event_id.clone(),
            at: self.at,
        }];
        commands.extend(
            customer
                .held
                .iter()
                .map(|fact| SubscriptionCommand::RecordFact {
                    fact: fact.clone(),
                    at: self.at,
                }),
        );
        let subscription =
            decide_in_turn(subscription, commands).map_err(LinkRefusal::HeldFactRefused)?;
        Ok(Linked {
            customer: customer_events,
            subscription,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::state_from;
    use crate::decisions::given::at;
    use crate::subscription::FactKind;

    fn fact(event_id: &str, created: i64, status: &str) -> SubscriptionFact {
        SubscriptionFact {
            event_id: event_id.to_string(),
            kind: FactKind::Updated,
            created,
            subscription_id: "sub_1".to_string(),
            customer_id: "cus_1".to_string(),
            status: status.to_string(),
        }
    }

    fn link() -> CustomerLink {
        CustomerLink {
            user_id: "u".to_string(),
            customer_id: "cus_1".to_string(),
            event_id: Some("evt_checkout".to_string()),
            at: at(),
        }
    }

    fn linked_customer(user_id: &str) -> StripeCustomer {
        state_from([StripeCustomerEvent::Linked {
            user_id: user_id.to_string(),
            at: at(),
        }])
    }

    #[test]
    fn a_fact_about_a_linked_customer_goes_to_the_users_subscription() {
        assert_eq!(
            FactDelivery::destination(&linked_customer("u")),
            Destination::Subscription {
                user_id: "u".to_string()
            }
        );
        let delivery = FactDelivery {
            fact: fact("evt_1", 10, "active"),
            at: at(),
        };
        let events = delivery
            .to_subscription(&Subscription::default())
            .expect("a complete fact");
        assert!(matches!(
            events.as_slice(),
            [SubscriptionEvent::StatusChanged { entitled: true, .. }]
        ));
    }

    #[test]
    fn a_fact_about_a_customer_not_linked_yet_is_held_on_the_customer() {
        let customer = StripeCustomer::default();
        assert_eq!(FactDelivery::destination(&customer), Destination::Customer);
        let delivery = FactDelivery {
            fact: fact("evt_1", 10, "active"),
            at: at(),
        };
        assert_eq!(
            delivery.hold(&customer),
            Ok(vec![StripeCustomerEvent::FactHeld {
                fact: fact("evt_1", 10, "active"),
                at: at(),
            }])
        );
        assert_eq!(
            delivery.hold(&linked_customer("u")),
            Err(StripeCustomerError::AlreadyLinked)
        );
    }

    #[test]
    fn linking_hands_the_subscription_every_fact_the_customer_held() {
        let customer: StripeCustomer = state_from([
            StripeCustomerEvent::FactHeld {
                fact: fact("evt_1", 10, "incomplete"),
                at: at(),
            },
            StripeCustomerEvent::FactHeld {
                fact: fact("evt_2", 20, "active"),
                at: at(),
            },
        ]);
        let linked = link()
            .decide(&customer, &Subscription::default())
            .expect("a customer of no one");
        assert_eq!(
            linked.customer,
            vec![StripeCustomerEvent::Linked {
                user_id: "u".to_string(),
                at: at(),
            }]
        );
        let subscription: Subscription = state_from(linked.subscription.clone());
        assert_eq!(subscription.customer_id.as_deref(), Some("cus_1"));
        assert_eq!(subscription.status.as_deref(), Some("active"));
        assert_eq!(linked.subscription.len(), 3);
    }

    #[test]
    fn linking_again_records_nothing() {
        let customer = linked_customer("u");
        let subscription: Subscription = state_from(
            link()
                .decide(&StripeCustomer::default(), &Subscription::default())
                .expect("first link")
                .subscription,
        );
        assert_eq!(
            link().decide(&customer, &subscription),
            Ok(Linked {
                customer: vec![],
                subscription: vec![],
            })
        );
    }

    #[test]
    fn a_customer_of_another_user_is_not_linked() {
        assert_eq!(
            link().decide(&linked_customer("someone-else"), &Subscription::default()),
            Err(LinkRefusal::LinkedToAnotherUser)
        );
    }

    #[test]
    fn an_incomplete_held_fact_refuses_the_whole_link() {
        let mut incomplete = fact("evt_1", 10, "active");
        incomplete.subscription_id.clear();
        let customer: StripeCustomer = state_from([StripeCustomerEvent::FactHeld {
            fact: incomplete,
            at: at(),
        }]);
        assert_eq!(
            link().decide(&customer, &Subscription::default()),
            Err(LinkRefusal::HeldFactRefused(
                SubscriptionError::IncompleteFact
            ))
        );
    }
}
