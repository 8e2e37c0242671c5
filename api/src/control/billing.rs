//! Billing decisions: what a verified Stripe event records, and the link between a Stripe customer and a user.

use chrono::Utc;
use whist_adapters::store::CommandError;
use whist_adapters::stripe::WebhookEvent;
use whist_domain::subscription::{
    FactKind, StripeCustomerCommand, StripeCustomerError, SubscriptionCommand, SubscriptionFact,
};
use whist_domain::{Actor, EventMetadata};

use super::{record_unit, Attempt, UseCaseError};
use crate::state::Context;

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
pub async fn record(context: &Context, event: &WebhookEvent) -> Result<Delivery, UseCaseError> {
    let metadata = EventMetadata::new(Actor::Stripe, Utc::now());
    if event.event_type == "checkout.session.completed" {
        let (Some(user_id), Some(customer_id)) = (&event.client_reference_id, &event.customer)
        else {
            tracing::info!("checkout session without a user or a customer: nothing to link");
            return Ok(Delivery::Ignored);
        };
        return link_customer(context, user_id, customer_id, Some(&event.id), &metadata)
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
    let fact = &fact;
    record_unit(context, &metadata, ATTEMPTS, |mut unit| async move {
        let (customer, _) = services
            .stripe_customers
            .load_caught_up(customer_id)
            .await?;
        match &customer.user_id {
            Some(user_id) => {
                let record = SubscriptionCommand::RecordFact {
                    fact: fact.clone(),
                    at: Utc::now(),
                };
                match services
                    .subscriptions
                    .stage(&mut unit, user_id, vec![record])
                    .await
                {
                    Ok(()) => {}
                    Err(CommandError::Rejected(error)) => {
                        tracing::info!(error = %error, "subscription fact refused");
                        return Ok(Attempt::Settled(Delivery::Ignored));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            // Not linked to a user yet (Checkout's completion may come later): held until the link.
            None => {
                let hold = StripeCustomerCommand::Hold {
                    fact: fact.clone(),
                    at: Utc::now(),
                };
                match services
                    .stripe_customers
                    .stage(&mut unit, customer_id, vec![hold])
                    .await
                {
                    Ok(()) => {}
                    Err(CommandError::Rejected(StripeCustomerError::AlreadyLinked)) => {
                        return Ok(Attempt::Again)
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(Attempt::Record(unit, Delivery::Recorded))
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
    record_unit(context, metadata, ATTEMPTS, |mut unit| async move {
        let (customer, _) = services
            .stripe_customers
            .load_caught_up(customer_id)
            .await?;
        match services
            .stripe_customers
            .stage(
                &mut unit,
                customer_id,
                vec![StripeCustomerCommand::Link {
                    user_id: user_id.to_string(),
                    at: Utc::now(),
                }],
            )
            .await
        {
            Ok(()) => {}
            Err(CommandError::Rejected(StripeCustomerError::LinkedToAnotherUser)) => {
                tracing::warn!(
                    customer_id,
                    user_id,
                    "Stripe customer already belongs to another user; not linked"
                );
                return Ok(Attempt::Settled(()));
            }
            Err(error) => return Err(error.into()),
        }
        let mut commands = vec![SubscriptionCommand::LinkCustomer {
            customer_id: customer_id.to_string(),
            event_id: event_id.map(str::to_string),
            at: Utc::now(),
        }];
        commands.extend(
            customer
                .held
                .iter()
                .map(|fact| SubscriptionCommand::RecordFact {
                    fact: fact.clone(),
                    at: Utc::now(),
                }),
        );
        match services
            .subscriptions
            .stage(&mut unit, user_id, commands)
            .await
        {
            Ok(()) => {}
            Err(CommandError::Rejected(error)) => {
                tracing::warn!(error = %error, "a held subscription fact was refused");
                return Ok(Attempt::Settled(()));
            }
            Err(error) => return Err(error.into()),
        }
        Ok(Attempt::Record(unit, ()))
    })
    .await
}
