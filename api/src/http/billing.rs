//! Stripe: the signed webhook that records subscription facts, and `GET /payment_portal_url`.
//!
//! The webhook is an OpenAPI operation like the others, so that the document describes it from its own types; its
//! body is a payload of ours ([`SignedStripeEvent`]) that keeps the raw bytes Stripe signed.

use chrono::Utc;
use poem::web::Data;
use poem::{FromRequest, Request, RequestBody};
use poem_openapi::param::Header;
use poem_openapi::payload::{Json, ParsePayload, Payload};
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{Example, Type};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use tracing::Instrument;
use whist_adapters::stripe::{verify_webhook, StripeApiError};
use whist_domain::{Actor, EventMetadata};

use crate::http::error::{error_body, ErrorBody, STORE_UNAVAILABLE};
use crate::http::host::Empty;
use crate::http::middleware::RequestId;
use crate::http::security::UserAuth;
use crate::state::AppState;

/// A Stripe event as Stripe sends it. The webserver reads only these fields (leniently: any other field may be
/// there, and Stripe adds fields and event types on its own schedule).
#[derive(Debug, Object)]
#[oai(example)]
pub struct StripeEvent {
    /// The event's id (`evt_…`). An id seen before answers `200` and changes nothing.
    pub id: String,
    /// Handled: `checkout.session.completed` (links `data.object.customer` to the user in
    /// `data.object.client_reference_id`) and `customer.subscription.created`, `.updated`, `.deleted` (the
    /// subscription's `data.object.status`). Any other type answers `200` and records nothing.
    #[oai(rename = "type")]
    pub event_type: String,
    /// When Stripe created the event, in Unix seconds: a stale event never overrides a newer state.
    #[oai(nullable)]
    pub created: Option<i64>,
    #[oai(nullable)]
    pub data: Option<StripeEventData>,
}

/// What a Stripe event is about.
#[derive(Debug, Object)]
pub struct StripeEventData {
    /// The Checkout session or the subscription; its `id`, `customer` (an id, or an expanded customer with its
    /// `id`), `status` and `client_reference_id` are read when they are strings.
    pub object: Option<serde_json::Value>,
}

impl Example for StripeEvent {
    fn example() -> Self {
        Self {
            id: "evt_1QxY2zAbCdEfGhIj".to_string(),
            event_type: "customer.subscription.updated".to_string(),
            created: Some(1_764_930_000),
            data: Some(StripeEventData {
                object: Some(serde_json::json!({
                    "id": "sub_1QxY2zAbCdEfGhIj",
                    "object": "subscription",
                    "customer": "cus_RqT5uVwXyZ0123",
                    "status": "active",
                })),
            }),
        }
    }
}

/// The body of `POST /stripe/webhook`, byte for byte as it arrived: the signature is over these bytes, so they are
/// never parsed and written again before it is checked. Documented as a [`StripeEvent`] in `application/json`.
pub struct SignedStripeEvent(pub Vec<u8>);

impl Payload for SignedStripeEvent {
    const CONTENT_TYPE: &'static str = "application/json";

    /// `application/json` with any parameters (Stripe sends `application/json; charset=utf-8`).
    fn check_content_type(content_type: &str) -> bool {
        content_type
            .split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    }

    fn schema_ref() -> MetaSchemaRef {
        StripeEvent::schema_ref()
    }

    fn register(registry: &mut Registry) {
        StripeEvent::register(registry);
    }
}

impl ParsePayload for SignedStripeEvent {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        Ok(Self(Vec::<u8>::from_request(request, body).await?))
    }
}

// The two-argument form: the one-argument form calls the macro by a path that only poem-openapi itself can resolve.
poem_openapi::impl_apirequest_for_payload!(SignedStripeEvent,);

#[derive(ApiResponse)]
pub enum WebhookResponse {
    /// Recorded, already recorded (an event id seen before), or of a type or shape the webserver does not use.
    #[oai(status = 200)]
    Received(Json<Empty>),
    /// A malformed, wrong or stale signature, or a signed body that is not a Stripe event (`BAD_SIGNATURE`); a
    /// body that is not UTF-8 (`UNREADABLE_BODY`); no `Stripe-Signature` at all (`INVALID_REQUEST`). Nothing is
    /// recorded.
    #[oai(status = 400)]
    Refused(Json<ErrorBody>),
    /// `STRIPE_WEBHOOK_SECRET` is not set (`STRIPE_NOT_CONFIGURED`), or the store failed (`STORE_UNAVAILABLE`).
    /// Nothing is recorded; Stripe delivers the event again.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
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
    /// Receive a signed Stripe event.
    ///
    /// Called by Stripe. The body is read raw and checked against `Stripe-Signature` before it is parsed: bad or
    /// stale signature, `400` and nothing recorded. Events may arrive out of order or more than once.
    #[oai(
        path = "/stripe/webhook",
        method = "post",
        operation_id = "receiveStripeWebhook"
    )]
    async fn stripe_webhook(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        /// `t=<Unix seconds>,v1=<hex of HMAC-SHA256 over "{t}.{raw body}" keyed with STRIPE_WEBHOOK_SECRET>`;
        /// several `v1` are accepted, and a signature over 300 s old is refused.
        #[oai(name = "Stripe-Signature")]
        signature: Header<String>,
        body: SignedStripeEvent,
    ) -> WebhookResponse {
        let Some(secret) = &state.settings.stripe.webhook_secret else {
            tracing::error!("a Stripe webhook arrived but STRIPE_WEBHOOK_SECRET is not set");
            return WebhookResponse::Unavailable(error_body("STRIPE_NOT_CONFIGURED"));
        };
        let Ok(payload) = String::from_utf8(body.0) else {
            return WebhookResponse::Refused(error_body("UNREADABLE_BODY"));
        };
        let event = match verify_webhook(
            &payload,
            &signature.0,
            secret.expose(),
            Utc::now().timestamp(),
        ) {
            Ok(event) => event,
            Err(refusal) => {
                tracing::warn!(reason = %refusal, "Stripe webhook refused");
                metrics::counter!("whist_stripe_webhooks_total", "outcome" => "refused")
                    .increment(1);
                return WebhookResponse::Refused(error_body("BAD_SIGNATURE"));
            }
        };
        let span = tracing::info_span!("stripe_event", event_id = %event.id, event_type = %event.event_type);
        let metadata = EventMetadata::for_request(Actor::Stripe, &request_id.0 .0, Utc::now());
        // The span goes with the future, never entered across an await (`clippy.toml`).
        async {
            match crate::control::billing::record(&state, &event, &metadata).await {
                Ok(delivery) => {
                    let label = match delivery {
                        crate::control::billing::Delivery::Recorded => "recorded",
                        crate::control::billing::Delivery::Ignored => "ignored",
                    };
                    metrics::counter!("whist_stripe_webhooks_total", "outcome" => label)
                        .increment(1);
                    WebhookResponse::Received(Json(Empty {}))
                }
                Err(error) => {
                    tracing::error!(
                        error = %crate::telemetry::Chain(&error),
                        "could not record a Stripe event; Stripe will deliver it again"
                    );
                    metrics::counter!("whist_stripe_webhooks_total", "outcome" => "failed")
                        .increment(1);
                    WebhookResponse::Unavailable(error_body(STORE_UNAVAILABLE))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Get the page where the user manages or starts a subscription.
    ///
    /// A Stripe billing-portal session for a subscriber, else a Checkout session.
    #[oai(
        path = "/payment_portal_url",
        method = "get",
        operation_id = "getPaymentPortalUrl"
    )]
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
