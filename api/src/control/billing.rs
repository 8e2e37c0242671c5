//! Billing decisions: what a verified Stripe event records, and the link between a Stripe customer and a user.

use chrono::Utc;
use whist_adapters::stripe::WebhookEvent;
use whist_domain::decisions::billing::{CustomerLink, Destination, FactDelivery, LinkRefusal};
use whist_domain::subscription::{FactKind, StripeCustomerError, SubscriptionFact};
use whist_domain::EventMetadata;

use super::{record_unit, Attempt, UseCaseError};
use crate::state::Context;
use crate::{final_on, stage_parts};

/// Attempts of one recording that lose to concurrent writers before the delivery answers 503 (Stripe retries).
const ATTEMPTS: usize = 8;

/// What a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Recorded (or already recorded: a repeated event id records nothing).
    Recorded,
    /// A type the webserver does not handle, or an event without the fields it needs: answered 200, nothing kept.
    Ignored,
}

/// Records what a verified Stripe event says.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt; nothing was recorded and Stripe will retry.
#[tracing::instrument(skip_all, fields(stripe_event_id = %event.id, event_type = %event.event_type))]
pub async fn record(
    context: &Context,
    event: &WebhookEvent,
    metadata: &EventMetadata,
) -> Result<Delivery, UseCaseError> {
    if event.event_type == "checkout.session.completed" {
        let (Some(user_id), Some(customer_id)) = (&event.client_reference_id, &event.customer)
        else {
            tracing::info!("checkout session without a user or a customer: nothing to link");
            return Ok(Delivery::Ignored);
        };
        return link_customer(context, user_id, customer_id, Some(&event.id), metadata)
            .await
            .map(|()| Delivery::Recorded);
    }
    let Some(kind) = FactKind::from_event_type(&event.event_type) else {
        return Ok(Delivery::Ignored);
    };
    let (Some(customer_id), Some(status)) = (&event.customer, &event.status) else {
        tracing::info!("subscription event without a customer or a status: nothing to record");
        return Ok(Delivery::Ignored);
    };
    let fact = SubscriptionFact {
        event_id: event.id.clone(),
        kind,
        created: event.created,
        subscription_id: event.object_id.clone(),
        customer_id: customer_id.clone(),
        status: status.clone(),
    };
    let services = &context.services;
    let delivery = &FactDelivery {
        fact,
        at: Utc::now(),
    };
    record_unit(context, metadata, ATTEMPTS, |mut unit| async move {
        let customer = services
            .stripe_customers
            .load_to_decide_caught_up(customer_id)
            .await?;
        let staged = match FactDelivery::destination(customer.state()) {
            Destination::Subscription { user_id } => {
                let subscription = services
                    .subscriptions
                    .load_to_decide(&unit, &user_id)
                    .await?;
                match delivery.to_subscription(subscription.state()) {
                    Ok(events) => {
                        stage_parts!(&mut unit, (services.subscriptions, subscription, events))
                    }
                    Err(_) if !final_on!((services.subscriptions, &subscription)) => false,
                    Err(error) => {
                        tracing::info!(error = %error, "subscription fact refused");
                        return Ok(Attempt::Settled(Delivery::Ignored));
                    }
                }
            }
            // Not linked to a user yet (Checkout's completion may come later): held until the link.
            Destination::Customer => match delivery.hold(customer.state()) {
                Ok(events) => {
                    stage_parts!(&mut unit, (services.stripe_customers, customer, events))
                }
                // Linked since it was read: the fact goes to the subscription on the next attempt.
                Err(StripeCustomerError::AlreadyLinked) => false,
                Err(error) => return Err(UseCaseError::Refused(Box::new(error))),
            },
        };
        Ok(if staged {
            Attempt::Record(unit, Delivery::Recorded)
        } else {
            Attempt::Again
        })
    })
    .await
}

/// Links a Stripe customer to a user, in both directions at once, and hands the user's subscription whatever the
/// customer held. Idempotent.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
#[tracing::instrument(skip_all, fields(user_id = %user_id, customer_id = %customer_id))]
pub async fn link_customer(
    context: &Context,
    user_id: &str,
    customer_id: &str,
    event_id: Option<&str>,
    metadata: &EventMetadata,
) -> Result<(), UseCaseError> {
    let services = &context.services;
    let link = &CustomerLink {
        user_id: user_id.to_string(),
        customer_id: customer_id.to_string(),
        event_id: event_id.map(str::to_string),
        at: Utc::now(),
    };
    record_unit(context, metadata, ATTEMPTS, |mut unit| async move {
        let customer = services
            .stripe_customers
            .load_to_decide_caught_up(customer_id)
            .await?;
        let subscription = services
            .subscriptions
            .load_to_decide(&unit, user_id)
            .await?;
        let linked = match link.decide(customer.state(), subscription.state()) {
            Ok(linked) => linked,
            Err(LinkRefusal::HeldFactRefused(_))
                if !final_on!((services.subscriptions, &subscription)) =>
            {
                return Ok(Attempt::Again)
            }
            Err(LinkRefusal::LinkedToAnotherUser) => {
                tracing::warn!(
                    customer_id,
                    user_id,
                    "Stripe customer already belongs to another user; not linked"
                );
                return Ok(Attempt::Settled(()));
            }
            Err(error @ LinkRefusal::HeldFactRefused(_)) => {
                tracing::warn!(error = %error, "a held subscription fact was refused");
                return Ok(Attempt::Settled(()));
            }
        };
        let staged = stage_parts!(
            &mut unit,
            (services.stripe_customers, customer, linked.customer),
            (services.subscriptions, subscription, linked.subscription),
        );
        Ok(if staged {
            Attempt::Record(unit, ())
        } else {
            Attempt::Again
        })
    })
    .await
}
