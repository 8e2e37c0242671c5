//! Bearer authentication for the desktop app, admins, hosts and protocol servers.

use poem::http::StatusCode;
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::SecurityScheme;
use whist_adapters::auth::Principal;

use crate::state::AppState;

/// The desktop app's Auth0 token (RS256, `sub` is the user).
///
/// Refused with `401 {"error": "UNAUTHORIZED"}` unless its signature, `iss`, `aud` and `exp` check.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_user")]
pub struct UserAuth(pub Principal);

async fn check_user(request: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let Some(state) = request.data::<AppState>() else {
        return Err(poem::Error::from_status(StatusCode::INTERNAL_SERVER_ERROR));
    };
    match state.services.verifier.verify(&bearer.token).await {
        Ok(principal) => Ok(principal),
        Err(error) => {
            tracing::info!(reason = %error, "bearer token refused");
            metrics::counter!("whist_auth_refusals_total").increment(1);
            Err(crate::http::error::json_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
            ))
        }
    }
}

/// The one-time bootstrap token a host was launched with (`WHIST_BOOTSTRAP_TOKEN` in its user data).
///
/// Checked by the handler (by HMAC, against the `instance_id` of the body), before anything is read.
#[derive(SecurityScheme)]
#[oai(ty = "bearer")]
pub struct BootstrapToken(pub Bearer);

/// The `auth_token` a host was given when it registered.
///
/// Checked by the handler (by HMAC, against the host it names), before anything is read.
#[derive(SecurityScheme)]
#[oai(ty = "bearer")]
pub struct HostToken(pub Bearer);

/// The protocol secret a mandelbox was spun up with (`protocol_secret` of `PUT /spin_up_mandelbox`).
///
/// Checked by the handler (by HMAC, against the mandelbox of the path), before anything is read.
#[derive(SecurityScheme)]
#[oai(ty = "bearer")]
pub struct ProtocolSecret(pub Bearer);

/// A developer's Auth0 token: as the desktop app's, and it must carry scope `admin`.
///
/// Refused with `401 {"error": "UNAUTHORIZED"}` as the desktop app's, and with `403 {"error": "FORBIDDEN"}` without
/// scope `admin`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_admin")]
pub struct AdminAuth(pub Principal);

async fn check_admin(request: &Request, bearer: Bearer) -> poem::Result<Principal> {
    let principal = check_user(request, bearer).await?;
    if principal.is_admin {
        Ok(principal)
    } else {
        tracing::info!(
            user_id = principal.user_id,
            "admin endpoint refused to a non-admin"
        );
        Err(crate::http::error::json_error(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ))
    }
}
