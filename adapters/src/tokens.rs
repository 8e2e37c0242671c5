//! Tokens the webserver hands out: each host's one-time bootstrap token, each host's auth token, and each
//! mandelbox's protocol secret. Each is an HMAC-SHA256 of its purpose and id under a server key kept in the
//! database, so that any process can recompute and check a token without storing it, and no event carries one.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::Secret;
use crate::store::Database;

type HmacSha256 = Hmac<Sha256>;

/// What a token is for; part of what is signed, so a token for one purpose never passes for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `WHIST_BOOTSTRAP_TOKEN` in a host's user data; valid for its one registration.
    Bootstrap,
    /// The host's `auth_token`, used both ways between the webserver and the host service.
    HostAuth,
    /// A mandelbox's protocol secret, which its protocol server presents on disconnect.
    Protocol,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Self::Bootstrap => "bootstrap",
            Self::HostAuth => "host-auth",
            Self::Protocol => "protocol",
        }
    }
}

/// Derives and checks tokens. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    key: Secret,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Tokens([redacted])")
    }
}

impl Tokens {
    /// Tokens under an explicit key (tests).
    pub fn with_key(key: Secret) -> Self {
        Self { key }
    }

    /// Loads the server key from the database, creating it on first use (the first process to start wins).
    ///
    /// # Errors
    /// The database failed.
    pub async fn load(database: &Database) -> Result<Self, sqlx::Error> {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        let candidate = hex::encode(bytes);
        sqlx::query(
            "INSERT INTO server_secrets (name, value) VALUES ('token_key', $1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(candidate)
        .execute(database.any())
        .await?;
        let key: String =
            sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = 'token_key'")
                .fetch_one(database.any())
                .await?;
        Ok(Self {
            key: Secret::new(key),
        })
    }

    /// The token for `purpose` and `id`.
    pub fn derive(&self, purpose: Purpose, id: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(self.key.expose().as_bytes())
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(purpose.label().as_bytes());
        mac.update(b":");
        mac.update(id.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Whether `presented` is the token for `purpose` and `id` (constant time).
    pub fn verify(&self, purpose: Purpose, id: &str, presented: &str) -> bool {
        let Ok(presented) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(presented)
        else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(self.key.expose().as_bytes())
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(purpose.label().as_bytes());
        mac.update(b":");
        mac.update(id.as_bytes());
        mac.verify_slice(&presented).is_ok()
    }
}

/// HMAC accepts keys of any length, so building one cannot fail.
fn unreachable_hmac() -> HmacSha256 {
    unreachable!("HMAC-SHA256 takes keys of any length")
}

/// A hash of a token for recording in an event (the token itself is never recorded).
pub fn fingerprint(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::with_key(Secret::new("k"))
    }

    #[test]
    fn a_token_verifies_for_its_own_purpose_and_id_only() {
        let token = tokens().derive(Purpose::HostAuth, "i-1");
        assert!(tokens().verify(Purpose::HostAuth, "i-1", &token));
        assert!(!tokens().verify(Purpose::HostAuth, "i-2", &token));
        assert!(!tokens().verify(Purpose::Bootstrap, "i-1", &token));
        assert!(!tokens().verify(Purpose::HostAuth, "i-1", "not-base64!"));
    }

    #[test]
    fn another_server_key_gives_other_tokens() {
        let other = Tokens::with_key(Secret::new("other"));
        assert_ne!(
            tokens().derive(Purpose::Protocol, "m"),
            other.derive(Purpose::Protocol, "m")
        );
    }
}
