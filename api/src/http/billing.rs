//! Stripe: the signed webhook that records subscription facts, and `GET /payment_portal_url`.

use chrono::Utc;
use poem::http::StatusCode;
use poem::web::Data;
use poem::{handler, Body, Request, Response};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use whist_adapters::stripe::{verify_webhook, StripeApiError};
use whist_domain::{Actor, EventMetadata};

use crate::http::error::{error_body, ErrorBody, STORE_UNAVAILABLE};
use crate::http::middleware::RequestId;
use crate::http::security::UserAuth;
use crate::state::AppState;

fn respond(status: StatusCode, code: &str) -> Response {
    Response::builder()
        .status(status)
        .content_type("application/json")
        .body(serde_json::json!({ "error": code }).to_string())
}

/// `POST /stripe/webhook`: the raw body is what Stripe signed, so this is a plain handler beside the OpenAPI routes.
#[handler]
pub async fn stripe_webhook(
    request: &Request,
    body: Body,
    state: Data<&AppState>,
    request_id: Data<&RequestId>,
) -> Response {
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
    let metadata = EventMetadata::for_request(Actor::Stripe, &request_id.0 .0, Utc::now());
    match crate::control::billing::record(&state, &event, &metadata).await {
        Ok(delivery) => {
            let label = match delivery {
                crate::control::billing::Delivery::Recorded => "recorded",
                crate::control::billing::Delivery::Ignored => "ignored",
            };
            metrics::counter!("whist_stripe_webhooks_total", "outcome" => label).increment(1);
            Response::builder()
                .status(StatusCode::OK)
                .content_type("application/json")
                .body("{}")
        }
        Err(error) => {
            tracing::error!(
                error = %crate::telemetry::Chain(&error),
                "could not record a Stripe event; Stripe will deliver it again"
            );
            metrics::counter!("whist_stripe_webhooks_total", "outcome" => "failed").increment(1);
            respond(StatusCode::SERVICE_UNAVAILABLE, STORE_UNAVAILABLE)
        }
    }
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
    let body = error_body(code);
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
    async fn payment_portal_url(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        auth: UserAuth,
    ) -> PortalResponse {
        let principal = auth.0;
        let Some(stripe) = &state.services.stripe else {
            return portal_error(503, "STRIPE_NOT_CONFIGURED");
        };
        let (subscription, _) = match state
            .services
            .subscriptions
            .load_caught_up(&principal.user_id)
            .await
        {
            Ok(loaded) => loaded,
            Err(error) => {
                crate::telemetry::log_failure("could not read the user's subscription", &error);
                return portal_error(503, STORE_UNAVAILABLE);
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
                let metadata = EventMetadata::for_request(
                    Actor::User(principal.user_id.clone()),
                    &request_id.0 .0,
                    Utc::now(),
                );
                if let Err(error) = crate::control::billing::link_customer(
                    &state,
                    &principal.user_id,
                    &customer_id,
                    None,
                    &metadata,
                )
                .await
                {
                    tracing::error!(error = %crate::telemetry::Chain(&error), "could not record the new Stripe customer");
                    return portal_error(503, STORE_UNAVAILABLE);
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
    crate::telemetry::log_failure("a Stripe API call failed", error);
    match error {
        StripeApiError::NotConfigured(_) => portal_error(503, "STRIPE_NOT_CONFIGURED"),
        StripeApiError::Call(_) | StripeApiError::MissingField(_) => {
            portal_error(502, "STRIPE_UNAVAILABLE")
        }
    }
}
