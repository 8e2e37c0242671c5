//! Stripe: the signed webhook that records subscription facts, and `GET /payment_portal_url`.

use chrono::Utc;
use poem::http::StatusCode;
use poem::web::Data;
use poem::{handler, Body, Request, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use whist_adapters::store::{CommandError, Unit};
use whist_adapters::stripe::{verify_webhook, StripeApiError, WebhookEvent};
use whist_domain::subscription::{
    FactKind, StripeCustomerCommand, StripeCustomerError, SubscriptionCommand, SubscriptionFact,
};
use whist_domain::{Actor, EventMetadata};

use crate::desktop::ErrorBody;
use crate::security::UserAuth;
use crate::state::AppState;

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

fn respond(status: StatusCode, code: &str) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(serde_json::json!({ "error": code }).to_string())
}

/// `POST /stripe/webhook`: the raw body is what Stripe signed, so this is a plain handler beside the OpenAPI routes.
#[handler]
pub async fn stripe_webhook(request: &Request, body: Body, state: Data<&AppState>) -> Response {
    let Some(secret) = &state.settings.stripe.webhook_secret else {
        tracing::error!("a Stripe webhook arrived but STRIPE_WEBHOOK_SECRET is not set");
        return respond(StatusCode::SERVICE_UNAVAILABLE, "STRIPE_NOT_CONFIGURED");
    };
    let Ok(payload) = body.into_string().await else {
        return respond(StatusCode::BAD_REQUEST, "UNREADABLE_BODY");
    };
    let signature = request
        .headers()
        .get("Stripe-Signature")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let event = match verify_webhook(&payload, signature, secret.expose(), Utc::now().timestamp()) {
        Ok(event) => event,
        Err(refusal) => {
            tracing::warn!(reason = %refusal, "Stripe webhook refused");
            metrics::counter!("whist_stripe_webhooks_total", "outcome" => "refused").increment(1);
            return respond(StatusCode::BAD_REQUEST, "BAD_SIGNATURE");
        }
    };
    let span =
        tracing::info_span!("stripe_event", event_id = %event.id, event_type = %event.event_type);
    let _entered = span.enter();
    match record(&state, &event).await {
        Ok(delivery) => {
            let label = match delivery {
                Delivery::Recorded => "recorded",
                Delivery::Ignored => "ignored",
            };
            metrics::counter!("whist_stripe_webhooks_total", "outcome" => label).increment(1);
            Response::builder()
                .status(StatusCode::OK)
                .content_type("application/json")
                .body("{}")
        }
        Err(error) => {
            tracing::error!(
                error,
                "could not record a Stripe event; Stripe will deliver it again"
            );
            metrics::counter!("whist_stripe_webhooks_total", "outcome" => "failed").increment(1);
            respond(StatusCode::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE")
        }
    }
}

/// Records what a verified Stripe event says.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt; nothing was recorded and Stripe will retry.
pub async fn record(state: &AppState, event: &WebhookEvent) -> Result<Delivery, String> {
    let metadata = EventMetadata::new(Actor::Stripe, Utc::now());
    if event.event_type == "checkout.session.completed" {
        let (Some(user_id), Some(customer_id)) = (&event.client_reference_id, &event.customer)
        else {
            tracing::info!("checkout session without a user or a customer: nothing to link");
            return Ok(Delivery::Ignored);
        };
        return link_customer(state, user_id, customer_id, Some(&event.id), &metadata)
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
    let services = &state.services;
    for _ in 0..ATTEMPTS {
        let (customer, _) = services
            .stripe_customers
            .load_current(customer_id)
            .await
            .map_err(|error| error.to_string())?;
        let mut unit = Unit::new(&metadata);
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
                        return Ok(Delivery::Ignored);
                    }
                    Err(error) => return Err(error.to_string()),
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
                    Err(CommandError::Rejected(StripeCustomerError::AlreadyLinked)) => continue,
                    Err(error) => return Err(error.to_string()),
                }
            }
        }
        match unit
            .record(&state.database)
            .await
            .map_err(|error| error.to_string())?
        {
            true => return Ok(Delivery::Recorded),
            false => continue,
        }
    }
    Err(format!(
        "{ATTEMPTS} attempts in a row lost to concurrent writers"
    ))
}

/// Links a Stripe customer to a user, in both directions at once, and hands the user's subscription whatever the
/// customer held. Idempotent.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
pub async fn link_customer(
    state: &AppState,
    user_id: &str,
    customer_id: &str,
    event_id: Option<&str>,
    metadata: &EventMetadata,
) -> Result<(), String> {
    let services = &state.services;
    for _ in 0..ATTEMPTS {
        let (customer, _) = services
            .stripe_customers
            .load_current(customer_id)
            .await
            .map_err(|error| error.to_string())?;
        let mut unit = Unit::new(metadata);
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
                return Ok(());
            }
            Err(error) => return Err(error.to_string()),
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
                return Ok(());
            }
            Err(error) => return Err(error.to_string()),
        }
        if unit
            .record(&state.database)
            .await
            .map_err(|error| error.to_string())?
        {
            return Ok(());
        }
    }
    Err(format!(
        "{ATTEMPTS} attempts in a row lost to concurrent writers"
    ))
}

#[derive(Tags)]
enum BillingTag {
    /// Subscriptions through Stripe.
    Billing,
}

/// Answer of `GET /payment_portal_url`.
#[derive(Debug, Object)]
pub struct PortalUrl {
    /// A Stripe billing-portal session for a subscriber, else a Checkout session.
    pub url: String,
}

#[derive(ApiResponse)]
pub enum PortalResponse {
    #[oai(status = 200)]
    Url(Json<PortalUrl>),
    /// Stripe failed or did not answer in time; nothing was recorded. Retry later.
    #[oai(status = 502)]
    BadGateway(Json<ErrorBody>),
    /// Stripe is not configured, or the store failed.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn portal_error(status: u16, code: &str) -> PortalResponse {
    let body = Json(ErrorBody {
        error: code.to_string(),
    });
    if status == 502 {
        PortalResponse::BadGateway(body)
    } else {
        PortalResponse::Unavailable(body)
    }
}

/// The billing API of the desktop app.
pub struct BillingApi;

#[OpenApi(tag = "BillingTag::Billing")]
impl BillingApi {
    /// Where the user manages or starts a subscription.
    #[oai(path = "/payment_portal_url", method = "get")]
    async fn payment_portal_url(&self, state: Data<&AppState>, auth: UserAuth) -> PortalResponse {
        let principal = auth.0;
        let Some(stripe) = &state.services.stripe else {
            return portal_error(503, "STRIPE_NOT_CONFIGURED");
        };
        let (subscription, _) = match state
            .services
            .subscriptions
            .load_current(&principal.user_id)
            .await
        {
            Ok(loaded) => loaded,
            Err(error) => {
                crate::error::log_failure("could not read the user's subscription", &error);
                return portal_error(503, "STORE_UNAVAILABLE");
            }
        };
        let customer_id = match &subscription.customer_id {
            Some(customer_id) => customer_id.clone(),
            None => {
                // Created with an idempotency key derived from the user, then linked: a failure between the two
                // leaves an unlinked customer that the next request gets back from Stripe and links.
                let customer_id = match stripe.create_customer(&principal.user_id, None).await {
                    Ok(customer_id) => customer_id,
                    Err(error) => return stripe_failure(&error),
                };
                let metadata =
                    EventMetadata::new(Actor::User(principal.user_id.clone()), Utc::now());
                if let Err(error) =
                    link_customer(&state, &principal.user_id, &customer_id, None, &metadata).await
                {
                    tracing::error!(error, "could not record the new Stripe customer");
                    return portal_error(503, "STORE_UNAVAILABLE");
                }
                customer_id
            }
        };
        let url = if subscription.is_entitled() {
            stripe.portal_url(&customer_id).await
        } else {
            stripe
                .checkout_url(
                    &customer_id,
                    &principal.user_id,
                    !subscription.ever_subscribed,
                )
                .await
        };
        match url {
            Ok(url) => PortalResponse::Url(Json(PortalUrl { url })),
            Err(error) => stripe_failure(&error),
        }
    }
}

fn stripe_failure(error: &StripeApiError) -> PortalResponse {
    crate::error::log_failure("a Stripe API call failed", error);
    match error {
        StripeApiError::NotConfigured(_) => portal_error(503, "STRIPE_NOT_CONFIGURED"),
        StripeApiError::Call(_) | StripeApiError::MissingField(_) => {
            portal_error(502, "STRIPE_UNAVAILABLE")
        }
    }
}
