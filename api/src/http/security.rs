//! Bearer authentication for the desktop app, admins, hosts and protocol servers.

use poem::http::StatusCode;
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::SecurityScheme;
use whist_adapters::auth::Principal;

use crate::state::AppState;

/// The desktop app's Auth0 token (RS256, `sub` is the user).
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

/// A host's or protocol server's token (`auth_token`, bootstrap token or protocol secret); which one is checked by
/// the handler, since it depends on the path.
#[derive(SecurityScheme)]
#[oai(ty = "bearer")]
pub struct PeerToken(pub Bearer);

/// A developer's Auth0 token: as [`UserAuth`], and it must carry scope `admin` (else 403).
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
