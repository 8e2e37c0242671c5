//! Stripe: webhook signatures and events, and the API calls behind `GET /payment_portal_url`.
//!
//! Webhooks: the signature is checked by `async-stripe-webhook` (HMAC-SHA256 over `"{t}.{raw body}"`, constant-time,
//! any of several `v1` signatures, 300 s tolerance). That crate also parses the whole event against the one Stripe API
//! version it was generated for, and refuses an event whose object lacks a field that version requires; so a parse
//! failure after a good signature is not a refusal: we read only the fields we need ourselves, and a field we do not
//! use can never make us drop a payment event.
//!
//! API: customers (created with an idempotency key derived from the user id, so that a retry or a concurrent request
//! gets the same customer), Checkout sessions in subscription mode, billing-portal sessions. `STRIPE_API_BASE` points
//! the client elsewhere (tests use a fake on loopback).

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};

use crate::config::StripeSettings;

/// How long one Stripe API call may take before the request answers 502.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a webhook delivery was refused (all answer 400, and nothing is recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookRefusal {
    #[error("the Stripe-Signature header is missing or malformed")]
    MalformedHeader,
    #[error("no v1 signature matches the body")]
    BadSignature,
    #[error("the signature is older than the 300 s tolerance")]
    Stale,
    #[error("the body is not a Stripe event")]
    NotAnEvent,
}

/// The fields of a Stripe event that the webserver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    pub id: String,
    pub event_type: String,
    /// Unix seconds.
    pub created: i64,
    pub object_id: String,
    pub customer: Option<String>,
    pub status: Option<String>,
    pub client_reference_id: Option<String>,
}

/// The envelope of a Stripe event, read leniently: only `id` and `type` must be there. Stripe adds event types and
/// fields on its own schedule, and a signed event we cannot read in full must still be acknowledged (a `400` makes
/// Stripe retry it for three days); each field we use is taken only when it has the shape we expect.
#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    created: Option<i64>,
    #[serde(default)]
    data: Option<RawData>,
}

#[derive(Deserialize)]
struct RawData {
    #[serde(default)]
    object: serde_json::Value,
}

/// Checks a webhook delivery's signature against `secret` at `now` (Unix seconds) and reads the event.
///
/// # Errors
/// The signature header is malformed, no `v1` signature matches, the signature is stale, or a signed body is not
/// a Stripe event.
pub fn verify_webhook(
    payload: &str,
    signature_header: &str,
    secret: &str,
    now: i64,
) -> Result<WebhookEvent, WebhookRefusal> {
    use stripe_webhook::{Webhook, WebhookError};
    match Webhook::construct_event_with_timestamp(payload, signature_header, secret, now) {
        // Signature and timestamp are checked before the crate parses; a parse failure means a good signature.
        Ok(_) | Err(WebhookError::BadParse(_)) => {}
        Err(WebhookError::BadTimestamp(_)) => return Err(WebhookRefusal::Stale),
        Err(WebhookError::BadHeader(_)) => return Err(WebhookRefusal::MalformedHeader),
        Err(_) => return Err(WebhookRefusal::BadSignature),
    }
    let raw: RawEvent = serde_json::from_str(payload).map_err(|_| WebhookRefusal::NotAnEvent)?;
    let object = raw.data.map(|data| data.object).unwrap_or_default();
    let text = |field: &str| {
        object
            .get(field)
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    // A customer id, or an expanded customer object.
    let customer = match object.get("customer") {
        Some(serde_json::Value::String(id)) => Some(id.clone()),
        Some(serde_json::Value::Object(customer)) => customer
            .get("id")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    Ok(WebhookEvent {
        id: raw.id,
        event_type: raw.event_type,
        created: raw.created.unwrap_or_default(),
        object_id: text("id").unwrap_or_default(),
        customer,
        status: text("status"),
        client_reference_id: text("client_reference_id"),
    })
}

/// A Stripe API call failed; the request answers 502 and nothing is recorded.
#[derive(Debug, thiserror::Error)]
pub enum StripeApiError {
    #[error("Stripe is not configured: {0} is not set")]
    NotConfigured(&'static str),
    #[error("the Stripe API call failed: {0}")]
    Call(String),
    #[error("the Stripe API answered without a {0}")]
    MissingField(&'static str),
}

/// The Stripe API as the webserver uses it.
#[derive(Clone)]
pub struct StripeApi {
    client: stripe::Client,
    price_id: Option<String>,
    trial_days: u32,
    return_url: String,
}

impl std::fmt::Debug for StripeApi {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StripeApi")
            .field("price_id", &self.price_id)
            .finish_non_exhaustive()
    }
}

impl StripeApi {
    /// A client for the configured account; `None` when `STRIPE_SECRET` is not set.
    ///
    /// # Errors
    /// `STRIPE_API_BASE` is not a URL the client takes.
    pub fn from_settings(settings: &StripeSettings) -> Result<Option<Self>, StripeApiError> {
        let Some(secret) = &settings.secret else {
            return Ok(None);
        };
        let mut base = settings.api_base.clone();
        if !base.ends_with('/') {
            base.push('/');
        }
        crate::tls::ensure_crypto_provider();
        let client = stripe::ClientBuilder::new(secret.expose())
            .url(base)
            .timeout(API_TIMEOUT)
            .build()
            .map_err(|error| StripeApiError::Call(error.to_string()))?;
        Ok(Some(Self {
            client,
            price_id: settings.price_id.clone(),
            trial_days: settings.trial_days,
            return_url: settings.return_url.clone(),
        }))
    }

    /// Creates the user's Stripe customer. The idempotency key is derived from the user id, so a retry (or a
    /// concurrent request) within Stripe's 24 h window gets the same customer.
    ///
    /// # Errors
    /// The call failed or timed out.
    pub async fn create_customer(
        &self,
        user_id: &str,
        email: Option<&str>,
    ) -> Result<String, StripeApiError> {
        let mut request = stripe_core::customer::CreateCustomer::new().metadata(HashMap::from([(
            "whist_user_id".to_string(),
            user_id.to_string(),
        )]));
        if let Some(email) = email {
            request = request.email(email);
        }
        let key = IdempotencyKey::new(customer_idempotency_key(user_id))
            .map_err(|error| StripeApiError::Call(error.to_string()))?;
        let customer = request
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map_err(|error| StripeApiError::Call(error.to_string()))?;
        Ok(customer.id.to_string())
    }

    /// A Checkout session in subscription mode for the configured price; with a trial when `offer_trial`.
    ///
    /// # Errors
    /// `STRIPE_PRICE_ID` is not set, or the call failed or timed out.
    pub async fn checkout_url(
        &self,
        customer_id: &str,
        user_id: &str,
        offer_trial: bool,
    ) -> Result<String, StripeApiError> {
        use stripe_checkout::checkout_session::{
            CreateCheckoutSession, CreateCheckoutSessionLineItems,
            CreateCheckoutSessionSubscriptionData,
        };
        let price = self
            .price_id
            .clone()
            .ok_or(StripeApiError::NotConfigured("STRIPE_PRICE_ID"))?;
        let mut line_item = CreateCheckoutSessionLineItems::new();
        line_item.price = Some(price);
        line_item.quantity = Some(1);
        let mut request = CreateCheckoutSession::new()
            .mode(stripe_shared::CheckoutSessionMode::Subscription)
            .customer(customer_id)
            .client_reference_id(user_id)
            .line_items(vec![line_item])
            .success_url(self.return_url.clone())
            .cancel_url(self.return_url.clone());
        if offer_trial && self.trial_days > 0 {
            let mut subscription = CreateCheckoutSessionSubscriptionData::new();
            subscription.trial_period_days = Some(self.trial_days);
            request = request.subscription_data(subscription);
        }
        let session = request
            .send(&self.client)
            .await
            .map_err(|error| StripeApiError::Call(error.to_string()))?;
        session.url.ok_or(StripeApiError::MissingField("url"))
    }

    /// A billing-portal session for the customer.
    ///
    /// # Errors
    /// The call failed or timed out.
    pub async fn portal_url(&self, customer_id: &str) -> Result<String, StripeApiError> {
        let session = stripe_billing::billing_portal_session::CreateBillingPortalSession::new()
            .customer(customer_id)
            .return_url(self.return_url.clone())
            .send(&self.client)
            .await
            .map_err(|error| StripeApiError::Call(error.to_string()))?;
        Ok(session.url)
    }
}

/// A `Stripe-Signature` header for `payload` as Stripe makes it (for tools that play Stripe: `whist loadtest`).
pub fn sign_webhook(payload: &str, secret: &str, timestamp: i64) -> String {
    stripe_webhook::Webhook::generate_test_header(payload, secret, Some(timestamp))
}

/// The idempotency key of the customer creation for one user (user ids may hold characters Stripe's keys should
/// not, so the key carries a digest).
pub fn customer_idempotency_key(user_id: &str) -> String {
    let digest = Sha256::digest(user_id.as_bytes());
    format!("whist-customer-{}", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    fn sign(payload: &str, secret: &str, t: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(format!("{t}.{payload}").as_bytes());
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    const EVENT: &str = r#"{"id":"evt_1","object":"event","type":"customer.subscription.created","created":1800000000,"data":{"object":{"id":"sub_1","object":"subscription","customer":"cus_1","status":"active"}}}"#;

    #[test]
    fn a_signed_event_is_read_even_when_it_lacks_fields_we_do_not_use() {
        let event = verify_webhook(
            EVENT,
            &sign(EVENT, "whsec_a", 1_800_000_000),
            "whsec_a",
            1_800_000_010,
        )
        .expect("a good signature");
        assert_eq!(event.id, "evt_1");
        assert_eq!(event.customer.as_deref(), Some("cus_1"));
        assert_eq!(event.status.as_deref(), Some("active"));
    }

    #[test]
    fn signatures_are_refused_for_the_right_reasons() {
        let now = 1_800_000_000;
        assert_eq!(
            verify_webhook(EVENT, &sign(EVENT, "whsec_b", now), "whsec_a", now),
            Err(WebhookRefusal::BadSignature)
        );
        assert_eq!(
            verify_webhook(EVENT, &sign(EVENT, "whsec_a", now - 301), "whsec_a", now),
            Err(WebhookRefusal::Stale)
        );
        let altered = EVENT.replace("active", "trialing");
        assert_eq!(
            verify_webhook(&altered, &sign(EVENT, "whsec_a", now), "whsec_a", now),
            Err(WebhookRefusal::BadSignature)
        );
        assert!(verify_webhook(EVENT, "garbage", "whsec_a", now).is_err());
    }

    /// rustls panics when more than one crypto provider is compiled in and none is chosen; building the client
    /// for Stripe's real (https) base would show it. No request is made.
    #[test]
    fn the_client_builds_for_the_real_https_api() {
        let settings = StripeSettings {
            secret: Some(crate::config::Secret::new("sk_test_x".to_string())),
            webhook_secret: None,
            price_id: None,
            api_base: "https://api.stripe.com".to_string(),
            trial_days: 7,
            return_url: "https://whist.com/".to_string(),
        };
        let built = StripeApi::from_settings(&settings).expect("builds");
        assert!(built.is_some());
    }

    #[test]
    fn any_of_several_v1_signatures_may_match() {
        let now = 1_800_000_000;
        let old = sign(EVENT, "whsec_old", now);
        let new = sign(EVENT, "whsec_new", now);
        let both = format!("{new},{}", old.split(',').nth(1).expect("a v1 part"));
        assert!(verify_webhook(EVENT, &both, "whsec_old", now).is_ok());
        assert!(verify_webhook(EVENT, &both, "whsec_new", now).is_ok());
    }
}
