//! Who may be served: users whose Stripe subscription is `active` or `trialing`, as Stripe's webhooks recorded it
//! (never a claim in a token), and developers (scope `admin`).

use whist_adapters::auth::Principal;
use whist_adapters::store::CommandError;
use whist_domain::subscription::SubscriptionError;

use crate::state::Context;

/// Whether `principal` may be assigned a mandelbox now. The user's subscription is read as of the log (the
/// remembered copy, kept current by the process's log follower within `FOLLOW_LAG_BOUND`, 250 ms), and a refusal is
/// only final on the subscription read caught up: a webhook answered 200 by any process counts for the very next
/// assign, and a subscription that ended stops counting in every process within the bound.
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
        .load_as_of_log_unless(&principal.user_id, |subscription| {
            !subscription.is_entitled()
        })
        .await?;
    Ok(subscription.is_entitled())
}
