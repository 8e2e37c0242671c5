//! Tokens the webserver hands out: each host's one-time bootstrap token, each host's auth token, and each
//! mandelbox's protocol secret. Each is `{key id}.{id}.{mac}`: an HMAC-SHA256 of its purpose, key id and id under
//! a server key, so that any process can recompute and check a token without storing it, and no event carries one.
//!
//! The keys come from `WHIST_TOKEN_KEYS` (the first one signs, every one listed verifies, so a new key is rolled in
//! before the old one is retired and live hosts are never cut off; a key removed from the list invalidates every
//! token it signed). In `ENVIRONMENT=local` without that key, one is generated and kept in the event database.
//! A token names the id it is for, so that a host's token says which host it speaks for before anything is read.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{Settings, TokenKey};
use crate::store::Database;

type HmacSha256 = Hmac<Sha256>;

/// The id of the key generated for `ENVIRONMENT=local` and kept in the database.
pub const LOCAL_KEY_ID: &str = "local";

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
    /// Never empty; the first one signs.
    keys: std::sync::Arc<Vec<TokenKey>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Tokens([redacted])")
    }
}

/// Why the token keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeysError {
    #[error("no token key is configured")]
    NoKey,
    #[error("could not read or create the local token key in the database")]
    Database(#[from] sqlx::Error),
}

impl Tokens {
    /// Tokens under the given keys, the first one signing.
    ///
    /// # Errors
    /// `keys` is empty.
    pub fn with_keys(keys: Vec<TokenKey>) -> Result<Self, TokenKeysError> {
        if keys.is_empty() {
            return Err(TokenKeysError::NoKey);
        }
        Ok(Self {
            keys: std::sync::Arc::new(keys),
        })
    }

    /// The keys the settings name (`WHIST_TOKEN_KEYS`), or else (only `ENVIRONMENT=local` starts without them) the
    /// local key kept in the database.
    ///
    /// # Errors
    /// The database failed.
    pub async fn for_settings(
        settings: &Settings,
        database: &Database,
    ) -> Result<Self, TokenKeysError> {
        if settings.token_keys.is_empty() {
            Self::load(database).await
        } else {
            Self::with_keys(settings.token_keys.clone())
        }
    }

    /// Loads the local key from the database, creating it on first use (the first process to start wins).
    ///
    /// # Errors
    /// The database failed.
    pub async fn load(database: &Database) -> Result<Self, TokenKeysError> {
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
        Self::with_keys(vec![TokenKey {
            id: LOCAL_KEY_ID.to_string(),
            bytes: key.into_bytes(),
        }])
    }

    /// The token for `purpose` and `id`, under the signing key.
    pub fn derive(&self, purpose: Purpose, id: &str) -> String {
        let key = &self.keys[0];
        let mac = mac(key, purpose, id).finalize().into_bytes();
        format!(
            "{}.{id}.{}",
            key.id,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac)
        )
    }

    /// Whether `presented` is the token for `purpose` and `id` under one of the keys (constant time).
    pub fn verify(&self, purpose: Purpose, id: &str, presented: &str) -> bool {
        self.subject(purpose, presented)
            .is_some_and(|subject| subject == id)
    }

    /// The id a genuine token for `purpose` was made for; `None` for anything else (another purpose, an unknown or
    /// retired key, a forged or malformed token). Needs no read of anything but the keys.
    pub fn subject<'t>(&self, purpose: Purpose, presented: &'t str) -> Option<&'t str> {
        let (key_id, rest) = presented.split_once('.')?;
        let (id, encoded) = rest.rsplit_once('.')?;
        let key = self.keys.iter().find(|key| key.id == key_id)?;
        let presented_mac = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .ok()?;
        mac(key, purpose, id)
            .verify_slice(&presented_mac)
            .is_ok()
            .then_some(id)
    }
}

fn mac(key: &TokenKey, purpose: Purpose, id: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(&key.bytes).unwrap_or_else(|_| unreachable_hmac());
    mac.update(purpose.label().as_bytes());
    mac.update(b":");
    mac.update(key.id.as_bytes());
    mac.update(b":");
    mac.update(id.as_bytes());
    mac
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

    fn key(id: &str, byte: u8) -> TokenKey {
        TokenKey {
            id: id.to_string(),
            bytes: vec![byte; 32],
        }
    }

    fn tokens() -> Tokens {
        Tokens::with_keys(vec![key("k1", 1)]).expect("a key")
    }

    #[test]
    fn a_token_verifies_for_its_own_purpose_and_id_only() {
        let token = tokens().derive(Purpose::HostAuth, "i-1");
        assert!(tokens().verify(Purpose::HostAuth, "i-1", &token));
        assert!(!tokens().verify(Purpose::HostAuth, "i-2", &token));
        assert!(!tokens().verify(Purpose::Bootstrap, "i-1", &token));
        assert!(!tokens().verify(Purpose::HostAuth, "i-1", "not-base64!"));
        assert!(!tokens().verify(Purpose::HostAuth, "i-1", "k1.i-1.AAAA"));
    }

    #[test]
    fn a_token_names_its_key_and_its_subject() {
        let token = tokens().derive(Purpose::HostAuth, "0b8a3c9e-4c1f-4e8b-9b1a-2f7d2c1e5a90");
        assert!(token.starts_with("k1.0b8a3c9e-4c1f-4e8b-9b1a-2f7d2c1e5a90."));
        assert_eq!(
            tokens().subject(Purpose::HostAuth, &token),
            Some("0b8a3c9e-4c1f-4e8b-9b1a-2f7d2c1e5a90")
        );
        let forged = token.replace("0b8a3c9e", "1b8a3c9e");
        assert_eq!(tokens().subject(Purpose::HostAuth, &forged), None);
    }

    #[test]
    fn another_server_key_gives_other_tokens() {
        let other = Tokens::with_keys(vec![key("k1", 2)]).expect("a key");
        let token = other.derive(Purpose::Protocol, "m");
        assert_ne!(tokens().derive(Purpose::Protocol, "m"), token);
        assert!(!tokens().verify(Purpose::Protocol, "m", &token));
    }

    #[test]
    fn a_new_key_signs_while_the_old_one_still_verifies_until_it_is_retired() {
        let old = tokens().derive(Purpose::HostAuth, "i-1");
        let rolled = Tokens::with_keys(vec![key("k2", 2), key("k1", 1)]).expect("keys");
        assert!(
            rolled.verify(Purpose::HostAuth, "i-1", &old),
            "live hosts keep working"
        );
        let new = rolled.derive(Purpose::HostAuth, "i-1");
        assert!(new.starts_with("k2."), "the first key signs");
        let retired = Tokens::with_keys(vec![key("k2", 2)]).expect("a key");
        assert!(retired.verify(Purpose::HostAuth, "i-1", &new));
        assert!(
            !retired.verify(Purpose::HostAuth, "i-1", &old),
            "a retired key's tokens are refused"
        );
    }

    #[test]
    fn a_key_id_cannot_be_swapped_for_another() {
        let rolled = Tokens::with_keys(vec![key("k2", 2), key("k1", 1)]).expect("keys");
        let token = rolled.derive(Purpose::HostAuth, "i-1");
        let relabelled = token.replacen("k2.", "k1.", 1);
        assert!(!rolled.verify(Purpose::HostAuth, "i-1", &relabelled));
    }
}
