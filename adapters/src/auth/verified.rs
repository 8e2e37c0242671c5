//! Tokens whose signature this process has already checked, so that a client's next request with the same token
//! costs a lookup instead of an RSA verification (about a tenth of the server's CPU per assign under load).
//!
//! Only a token that passed every check is remembered, and only for as long as it would pass them again:
//! - **The same bytes.** The key is the whole token, compared in full; a token that differs in one byte is checked
//!   as a new one.
//! - **The same key.** The entry holds the key that verified it and counts only while the verifier would use that
//!   very key for the token's `kid` (the same `Arc`): a JWKS fetch that drops or replaces the key, or keys that
//!   expire unrefreshed, end the entry, because the key is looked up (and refused when gone) before the entry is.
//! - **Until `exp`.** An entry counts until the token's `exp` plus the leeway the full check allows, and no longer
//!   than [`REMEMBERED_FOR`] after it was checked. Issuer, audience, `sub` and the signature do not change with time,
//!   and a token past its `nbf` stays past it.
//!
//! The map holds at most [`MOST_REMEMBERED`] tokens; when full, the expired ones go and, should none have, all of
//! them (a refusal is never remembered, so only genuine tokens can fill it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jsonwebtoken::DecodingKey;

use super::Principal;

/// How many tokens are remembered at most.
pub const MOST_REMEMBERED: usize = 8_192;
/// How long a checked token is remembered at most, whatever its `exp`.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(300);

struct Entry {
    principal: Principal,
    key: Arc<DecodingKey>,
    /// Seconds since the Unix epoch until which the entry counts.
    until: u64,
}

/// The tokens remembered as checked. Cheap to clone (clones share the map).
#[derive(Clone, Default)]
pub(crate) struct VerifiedTokens {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

impl VerifiedTokens {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Every critical section leaves the map consistent (none panics), so a poisoned lock is safe to take over.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whom `token` speaks for, if it was checked with `key` and still counts at `now`.
    pub(crate) fn get(&self, token: &str, key: &Arc<DecodingKey>, now: u64) -> Option<Principal> {
        let entries = self.entries();
        let entry = entries.get(token)?;
        (Arc::ptr_eq(&entry.key, key) && now <= entry.until).then(|| entry.principal.clone())
    }

    /// Remembers that `token` passed every check with `key` at `now`, counting until `valid_until` (its `exp` plus
    /// the leeway) or [`REMEMBERED_FOR`], whichever comes first.
    pub(crate) fn remember(
        &self,
        token: &str,
        key: &Arc<DecodingKey>,
        principal: &Principal,
        now: u64,
        valid_until: u64,
    ) {
        let until = valid_until.min(now.saturating_add(REMEMBERED_FOR.as_secs()));
        if until < now {
            return;
        }
        let mut entries = self.entries();
        if entries.len() >= MOST_REMEMBERED && !entries.contains_key(token) {
            entries.retain(|_, entry| entry.until >= now);
            if entries.len() >= MOST_REMEMBERED {
                entries.clear();
            }
        }
        entries.insert(
            token.to_string(),
            Entry {
                principal: principal.clone(),
                key: key.clone(),
                until,
            },
        );
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<DecodingKey> {
        Arc::new(DecodingKey::from_secret(b"not used to verify here"))
    }

    fn alice() -> Principal {
        Principal {
            user_id: "alice".to_string(),
            is_admin: false,
        }
    }

    #[test]
    fn a_remembered_token_counts_only_with_the_same_key_and_until_its_end() {
        let tokens = VerifiedTokens::default();
        let key = key();
        tokens.remember("t", &key, &alice(), 1_000, 1_100);
        assert_eq!(tokens.get("t", &key, 1_050), Some(alice()));
        assert_eq!(tokens.get("t", &key, 1_100), Some(alice()));
        assert_eq!(tokens.get("t", &key, 1_101), None, "past exp + leeway");
        assert_eq!(
            tokens.get("t", &self::key(), 1_050),
            None,
            "another key object, even with the same bytes"
        );
        assert_eq!(tokens.get("t2", &key, 1_050), None);
        assert_eq!(tokens.get("", &key, 1_050), None);
    }

    #[test]
    fn a_token_is_remembered_no_longer_than_the_bound_whatever_its_exp() {
        let tokens = VerifiedTokens::default();
        let key = key();
        tokens.remember("t", &key, &alice(), 1_000, u64::MAX);
        let bound = 1_000 + REMEMBERED_FOR.as_secs();
        assert_eq!(tokens.get("t", &key, bound), Some(alice()));
        assert_eq!(tokens.get("t", &key, bound + 1), None);
    }

    #[test]
    fn the_map_stays_bounded_dropping_expired_tokens_first() {
        let tokens = VerifiedTokens::default();
        let key = key();
        for index in 0..MOST_REMEMBERED {
            // Half expire at 1_010, half live on.
            let valid_until = if index % 2 == 0 { 1_010 } else { 2_000 };
            tokens.remember(&format!("t{index}"), &key, &alice(), 1_000, valid_until);
        }
        assert_eq!(tokens.len(), MOST_REMEMBERED);
        tokens.remember("new", &key, &alice(), 1_020, 2_000);
        assert_eq!(tokens.len(), MOST_REMEMBERED / 2 + 1);
        assert_eq!(tokens.get("t1", &key, 1_020), Some(alice()));
        assert_eq!(tokens.get("new", &key, 1_020), Some(alice()));
        // Full of live tokens: all go, the new one stays.
        for index in 0..MOST_REMEMBERED {
            tokens.remember(&format!("u{index}"), &key, &alice(), 1_020, 2_000);
        }
        assert!(tokens.len() <= MOST_REMEMBERED);
        assert_eq!(
            tokens.get(&format!("u{}", MOST_REMEMBERED - 1), &key, 1_020),
            Some(alice())
        );
    }
}
