//! Who may be served: users whose Stripe subscription is `active` or `trialing`, as Stripe's webhooks recorded it
//! (never a claim in a token), and developers (scope `admin`).

use whist_adapters::auth::Principal;
use whist_adapters::store::CommandError;
use whist_domain::subscription::SubscriptionError;

use crate::state::Context;

/// Whether `principal` may be assigned a mandelbox now. The user's subscription is read fresh (the remembered copy
/// plus whatever was recorded since, by any process), so a webhook answered 200 counts for the very next assign.
///
/// # Errors
/// The store failed.
pub async fn is_entitled(
    state: &Context,
    principal: &Principal,
) -> Result<bool, CommandError<SubscriptionError>> {
    if principal.is_admin {
        return Ok(true);
    }
    let (subscription, _) = state
        .services
        .subscriptions
        .load_caught_up(&principal.user_id)
        .await?;
    Ok(subscription.is_entitled())
}
