//! Who may be served. Until subscriptions are recorded from Stripe (the subscriptions issue), every signed-in
//! user is entitled; this is the one function the subscription gate will replace.

use whist_adapters::auth::Principal;

use crate::state::AppState;

/// Whether `principal` may be assigned a mandelbox. Developers (scope `admin`) always may.
pub async fn is_entitled(_state: &AppState, _principal: &Principal) -> bool {
    true
}
