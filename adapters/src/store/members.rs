//! Membership: the processes that serve assigns right now, and which hosts each fills first.
//!
//! Every `serve` process renews its row in `members` once a second (by the database's clock); a row not renewed
//! for [`MEMBER_TTL`] is no longer a member. Each host belongs to one member by rendezvous hashing (the member with
//! the highest hash of member and host), so that every process computes the same partition from the same list,
//! and a member joining or leaving moves only its own share of hosts. An assign tries the hosts of its own process
//! first: two processes then fill different hosts instead of racing for the same fullest ones, and the copies each
//! remembers of its own hosts stay current because it is their only writer. When its own hosts are full it falls
//! back to the others. The partition is a preference only: every allocation is still decided by the store's
//! optimistic concurrency, so two processes that disagree on the list for a second cost a retry, never a double
//! allocation.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::lease::now_ms;
use super::Database;

/// How long a member stays one without renewing its row.
pub const MEMBER_TTL: Duration = Duration::from_secs(5);
/// How often a member renews its row and reads the others'.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Rows of members gone this long are deleted by whoever renews.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// This process's membership and its latest view of the others.
#[derive(Clone)]
pub struct Members {
    database: Database,
    id: Arc<str>,
    /// The live members' ids, sorted; this process is always among them.
    live: Arc<RwLock<Arc<[String]>>>,
}

impl Members {
    /// A member of id `id` (unique per process), alone until [`Members::renew`] reads the others.
    pub fn new(database: &Database, id: &str) -> Self {
        Self {
            database: database.clone(),
            id: Arc::from(id),
            live: Arc::new(RwLock::new(Arc::from(vec![id.to_string()]))),
        }
    }

    /// This process's member id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Renews this member's row and reads the live members (one statement each).
    ///
    /// # Errors
    /// The database failed; the last view is kept.
    pub async fn renew(&self) -> Result<(), sqlx::Error> {
        let now = now_ms(&self.database);
        let ttl_ms = i64::try_from(MEMBER_TTL.as_millis()).unwrap_or(i64::MAX / 2);
        let forget_ms = i64::try_from(FORGET_AFTER.as_millis()).unwrap_or(i64::MAX / 2);
        sqlx::query(&format!(
            "INSERT INTO members (member_id, seen_at_ms) VALUES ($1, {now}) \
             ON CONFLICT (member_id) DO UPDATE SET seen_at_ms = EXCLUDED.seen_at_ms"
        ))
        .bind(self.id.as_ref())
        .execute(self.database.any())
        .await?;
        sqlx::query(&format!(
            "DELETE FROM members WHERE seen_at_ms < {now} - $1"
        ))
        .bind(forget_ms)
        .execute(self.database.any())
        .await?;
        let mut live: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT member_id FROM members WHERE seen_at_ms >= {now} - $1 ORDER BY member_id"
        ))
        .bind(ttl_ms)
        .fetch_all(self.database.any())
        .await?;
        if !live
            .iter()
            .any(|member| member.as_str() == self.id.as_ref())
        {
            live.push(self.id.to_string());
            live.sort();
        }
        if let Ok(mut view) = self.live.write() {
            *view = Arc::from(live);
        }
        Ok(())
    }

    /// Leaves (a clean shutdown): the others take over this member's hosts at their next renewal instead of after
    /// [`MEMBER_TTL`].
    ///
    /// # Errors
    /// The database failed.
    pub async fn leave(&self) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM members WHERE member_id = $1")
            .bind(self.id.as_ref())
            .execute(self.database.any())
            .await
            .map(|_| ())
    }

    /// The live members as last read, sorted.
    pub fn live(&self) -> Arc<[String]> {
        self.live
            .read()
            .map(|view| view.clone())
            .unwrap_or_else(|_| Arc::from(vec![self.id.to_string()]))
    }

    /// Reorders `candidates` (host id first) so that this member's hosts come first, each part in its order; how
    /// many are this member's (all of them when it is the only member). Each candidate's owner is computed once,
    /// from each member's hash prefix computed once per call (this runs on every assign).
    pub fn put_own_first<T>(&self, candidates: &mut [(String, T)]) -> usize {
        put_own_first(&self.live(), &self.id, candidates)
    }

    /// Renews every [`RENEW_EVERY`] until `shutdown`, then leaves.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            if let Err(error) = self.renew().await {
                tracing::warn!(error = %error, "could not renew this process's membership");
            }
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        if let Err(error) = self.leave().await {
            tracing::warn!(error = %error, "could not leave the membership; it lapses by itself");
        }
    }
}

/// [`Members::put_own_first`] for member `me` among `live`.
fn put_own_first<T>(live: &[String], me: &str, candidates: &mut [(String, T)]) -> usize {
    if live.len() < 2 {
        return candidates.len();
    }
    let members = prefixed(live);
    let mut own = 0;
    // Stable, and calls the key function once per candidate.
    candidates.sort_by_cached_key(|(host, _)| {
        let mine = owner_by_prefix(&members, host) == Some(me);
        own += usize::from(mine);
        !mine
    });
    own
}

/// The member that owns `key` among `members`: the one with the highest hash of (member, key).
pub fn owner<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    owner_by_prefix(&prefixed(members), key)
}

/// Each member with its [`member_prefix`], computed once for every key it is weighed against.
fn prefixed(members: &[String]) -> Vec<(u64, &str)> {
    members
        .iter()
        .map(|member| (member_prefix(member), member.as_str()))
        .collect()
}

/// [`owner`], given [`prefixed`] members.
fn owner_by_prefix<'a>(members: &[(u64, &'a str)], key: &str) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|(prefix, member)| (weight(*prefix, key), *member))
        .map(|(_, member)| *member)
}

/// FNV-1a over member, a separator and key (the same in every process and release, unlike std's hasher): its state
/// after the member and the separator.
fn member_prefix(member: &str) -> u64 {
    fnv(0xcbf2_9ce4_8422_2325, member.bytes().chain([0xff]))
}

/// The weight of (member, key), from the member's prefix.
fn weight(prefix: u64, key: &str) -> u64 {
    let mut hash = fnv(prefix, key.bytes());
    // FNV's low bits mix poorly for inputs differing only at the end: finish with a multiply-shift.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

fn fnv(mut hash: u64, bytes: impl Iterator<Item = u8>) -> u64 {
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn every_host_has_one_owner_and_the_hosts_spread_over_the_members() {
        let two = members(&["a", "b"]);
        let hosts: Vec<String> = (0..1000).map(|index| format!("host-{index}")).collect();
        let of_a = hosts
            .iter()
            .filter(|host| owner(&two, host) == Some("a"))
            .count();
        assert!((400..=600).contains(&of_a), "a owns {of_a} of 1000");
        assert_eq!(owner(&[], "host"), None);
    }

    #[test]
    fn a_member_joining_takes_hosts_only_from_the_others_and_leaving_gives_back_only_its_own() {
        let two = members(&["a", "b"]);
        let three = members(&["a", "b", "c"]);
        for index in 0..1000 {
            let host = format!("host-{index}");
            let before = owner(&two, &host);
            let after = owner(&three, &host);
            assert!(
                after == before || after == Some("c"),
                "{host} moved from {before:?} to {after:?}, not to the new member"
            );
        }
    }

    #[test]
    fn own_hosts_come_first_in_their_order_as_owner_says() {
        let live = members(&["a", "b", "c"]);
        let hosts: Vec<(String, usize)> = (0..200)
            .map(|index| (format!("host-{index}"), index))
            .collect();
        for me in ["a", "b", "c"] {
            let mut ordered = hosts.clone();
            let own = put_own_first(&live, me, &mut ordered);
            let expected_own: Vec<(String, usize)> = hosts
                .iter()
                .filter(|(host, _)| owner(&live, host) == Some(me))
                .cloned()
                .collect();
            let expected_rest: Vec<(String, usize)> = hosts
                .iter()
                .filter(|(host, _)| owner(&live, host) != Some(me))
                .cloned()
                .collect();
            assert_eq!(own, expected_own.len());
            assert_eq!(ordered[..own], expected_own[..]);
            assert_eq!(ordered[own..], expected_rest[..]);
        }
    }
}
