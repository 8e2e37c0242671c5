//! What handlers act through: the aggregate stores, token services and in-memory books of one process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use whist_adapters::auth::TokenVerifier;
use whist_adapters::config::{CloudKind, Settings};
use whist_adapters::ec2::{Ec2, Ec2Access};
use whist_adapters::store::{AggregateStore, Database};
use whist_adapters::stripe::{StripeApi, StripeApiError};
use whist_adapters::tokens::Tokens;
use whist_domain::assign_key::AssignKey;
use whist_domain::images::ImageCatalog;
use whist_domain::instance::Instance;
use whist_domain::leadership::Leadership;
use whist_domain::mandelbox::Mandelbox;
use whist_domain::service::Service;
use whist_domain::session::Session;
use whist_domain::subscription::{StripeCustomer, Subscription};
use whist_domain::user::User;

use crate::workers::heartbeats::HeartbeatBook;

/// The aggregate stores and services of one process.
pub struct Services {
    pub verifier: TokenVerifier,
    pub tokens: Tokens,
    pub instances: AggregateStore<Instance>,
    pub mandelboxes: AggregateStore<Mandelbox>,
    pub sessions: AggregateStore<Session>,
    pub users: AggregateStore<User>,
    pub catalog: AggregateStore<ImageCatalog>,
    pub subscriptions: AggregateStore<Subscription>,
    pub stripe_customers: AggregateStore<StripeCustomer>,
    pub service: AggregateStore<Service>,
    /// Who leads the fleet's decisions, and the fence on them.
    pub leadership: AggregateStore<Leadership>,
    /// Assigns' idempotency keys and the answers they stand for.
    pub assign_keys: AggregateStore<AssignKey>,
    /// The Stripe API; `None` when `STRIPE_SECRET` is not set.
    pub stripe: Option<StripeApi>,
    /// EC2, with `WHIST_CLOUD=aws`.
    pub ec2: Option<Ec2>,
    pub heartbeats: HeartbeatBook,
    pub user_rate: RateLimiter,
    pub ip_rate: RateLimiter,
    /// `WHIST_ASSIGN_CONCURRENCY` places for assigns in flight, waited for only while the bound has been full for
    /// less than `WHIST_ASSIGN_QUEUE_MS`.
    pub assign_admission: AssignAdmission,
    pub host_locks: HostLocks,
    /// One lock per user within this process, held around a whole assign and a whole end of a mandelbox (taken
    /// before any host's lock): one user's decisions in this process queue instead of colliding on the user's
    /// aggregate, where each collision costs a catch-up read and another attempt. Under a backlog, collisions
    /// would otherwise feed it (an open loop at 950/s over 64 users once spent 16 reads per assign and collapsed).
    pub user_locks: KeyedLocks,
    /// The candidate hosts the `instances` read model gave last, per region and release.
    pub candidate_hints: CandidateHints,
    /// The processes serving assigns, and which hosts this one fills first.
    pub members: whist_adapters::store::members::Members,
}

/// One lock per host within this process: commands on one host's aggregate from this process queue here instead of
/// colliding in the store (a collision costs a round trip, a catch-up read and a retry). Across processes the
/// store's optimistic concurrency still decides; a host on which an assign of this process lost to another writer
/// is marked contended for `CONTENDED_FOR`, and assigns of this process try it after the others meanwhile, so that
/// several processes spread over hosts instead of all racing for the fullest.
#[derive(Default)]
pub struct HostLocks {
    locks: KeyedLocks,
    contended: Mutex<HashMap<String, std::time::Instant>>,
}

/// An async lock per key (a host, a user), made on first use; locks no one holds are dropped once there are many.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// The lock of `key`.
    pub fn of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let Ok(mut locks) = self.locks.lock() else {
            return Arc::new(tokio::sync::Mutex::new(()));
        };
        if locks.len() > 50_000 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
    }

    /// Waits for the lock of `key` and holds it until the guard is dropped.
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.of(key).lock_owned().await
    }
}

/// How long a host on which an assign lost to another writer is tried after the others.
const CONTENDED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The hosts with room the `instances` read model gave this process last, per region and release. The assigns of
/// the next `HINTS_FOR` try them first instead of reading the read model again (a statement per assign). They are
/// hints, as the read model's rows always were (it lags the log): each host decides on its own state whether it has
/// room, and an assign that none of them takes reads the read model afresh before it answers that no host has room.
#[derive(Default)]
pub struct CandidateHints {
    read: Mutex<HashMap<(String, String), Hints>>,
}

/// Hosts read at an instant.
type Hints = (std::time::Instant, Arc<Vec<(String, String)>>);

/// How long a read of the candidate hosts serves the assigns after it: about the read model's own lag behind the log
/// (its projection gathers appends for 20 ms, then writes them).
pub const HINTS_FOR: std::time::Duration = std::time::Duration::from_millis(100);

impl CandidateHints {
    /// The hosts read for `region` and `hash` less than `HINTS_FOR` ago.
    pub fn recent(&self, region: &str, hash: &str) -> Option<Arc<Vec<(String, String)>>> {
        let read = self.read.lock().ok()?;
        let (at, hosts) = read.get(&(region.to_string(), hash.to_string()))?;
        (at.elapsed() < HINTS_FOR).then(|| hosts.clone())
    }

    /// Keeps `hosts`, just read for `region` and `hash`.
    pub fn keep(&self, region: &str, hash: &str, hosts: Arc<Vec<(String, String)>>) {
        if let Ok(mut read) = self.read.lock() {
            if read.len() > 1_000 {
                read.retain(|_, (at, _)| at.elapsed() < HINTS_FOR);
            }
            read.insert(
                (region.to_string(), hash.to_string()),
                (std::time::Instant::now(), hosts),
            );
        }
    }
}

/// Whether a host marked contended at `since` still is.
fn recently(since: Option<&std::time::Instant>) -> bool {
    since.is_some_and(|since| since.elapsed() < CONTENDED_FOR)
}

impl HostLocks {
    /// Marks a host on which an assign of this process lost to another writer.
    pub fn mark_contended(&self, instance_id: &str) {
        if let Ok(mut contended) = self.contended.lock() {
            if contended.len() > 10_000 {
                contended.retain(|_, since| recently(Some(since)));
            }
            contended.insert(instance_id.to_string(), std::time::Instant::now());
        }
    }

    /// Whether an assign of this process lost to another writer on this host within `CONTENDED_FOR` (assigns use
    /// `put_contended_last`; this is for tests).
    #[cfg(test)]
    fn is_contended(&self, instance_id: &str) -> bool {
        self.contended
            .lock()
            .is_ok_and(|contended| recently(contended.get(instance_id)))
    }

    /// Moves the contended hosts among `candidates` after the others, each group keeping its order.
    pub fn put_contended_last<T>(&self, candidates: &mut [(String, T)]) {
        if let Ok(contended) = self.contended.lock() {
            if !contended.is_empty() {
                candidates
                    .sort_by_cached_key(|(instance_id, _)| recently(contended.get(instance_id)));
            }
        }
    }

    /// The lock of one host.
    pub fn of(&self, instance_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.of(instance_id)
    }
}

impl Services {
    /// Builds the services over `database`.
    ///
    /// # Errors
    /// The server key could not be read or created, or the Stripe client could not be built.
    pub async fn new(settings: &Settings, database: &Database) -> Result<Self, ServicesError> {
        Ok(Self {
            verifier: TokenVerifier::new(settings),
            tokens: Tokens::for_settings(settings, database).await?,
            instances: AggregateStore::new(database, ()),
            mandelboxes: AggregateStore::new(database, ()),
            sessions: AggregateStore::new(database, ()),
            users: AggregateStore::new(database, ()),
            catalog: AggregateStore::singleton(database, ()),
            subscriptions: AggregateStore::new(database, ()),
            stripe_customers: AggregateStore::new(database, ()),
            service: AggregateStore::singleton(database, ()),
            leadership: AggregateStore::singleton(database, ()),
            assign_keys: AggregateStore::new(database, ()),
            stripe: StripeApi::from_settings(&settings.stripe)?,
            ec2: (settings.cloud == CloudKind::Aws).then(|| {
                Ec2::new(
                    &settings.aws.deployment,
                    Ec2Access {
                        endpoint_url: settings.aws.endpoint_url.clone(),
                        static_credentials: settings
                            .aws
                            .static_credentials
                            .as_ref()
                            .map(|(key, secret)| (key.clone(), secret.expose().to_string())),
                    },
                )
            }),
            heartbeats: HeartbeatBook::new(database.clone(), settings.heartbeat_timeout),
            user_rate: RateLimiter::new(settings.assign_rate_limit_per_minute),
            ip_rate: RateLimiter::new(settings.assign_rate_limit_per_ip_per_minute),
            assign_admission: AssignAdmission::new(
                settings.assign_concurrency,
                settings.assign_queue,
            ),
            host_locks: HostLocks::default(),
            user_locks: KeyedLocks::default(),
            candidate_hints: CandidateHints::default(),
            members: whist_adapters::store::members::Members::new(
                database,
                &uuid::Uuid::new_v4().to_string(),
            ),
        })
    }
}

/// Why the services could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("could not prepare the token keys")]
    Tokens(#[from] whist_adapters::tokens::TokenKeysError),
    #[error("could not build the Stripe client")]
    Stripe(#[from] StripeApiError),
}

/// At most a bound of assigns in flight in this process (`WHIST_ASSIGN_CONCURRENCY`), told a stall from overload as
/// CoDel tells a passing queue from a standing one. An assign that finds the bound full waits for a place while the
/// bound has been full for less than `grace` (`WHIST_ASSIGN_QUEUE_MS`): counted from the last assign that found a
/// place at once, so that every assign waiting in one stall is admitted or refused within `grace` of its start. Once
/// the bound has been full that long, the process is taking more than it can decide: it sheds, and every assign that
/// finds the bound full is refused at once (answered 429, which the desktop app retries after `Retry-After`), since
/// waiting would only lengthen every answer and how long each slot is held. It sheds until an assign finds half the
/// places free, the backlog gone; without that hysteresis, overload would let a queue build for `grace` again each
/// time one place came free (measured: goodput 15% lower, p50 six times longer). Places go to waiters in order of
/// arrival.
pub struct AssignAdmission {
    places: tokio::sync::Semaphore,
    grace: Duration,
    /// When an assign last found a place without waiting, in milliseconds since `epoch`.
    last_free_ms: AtomicU64,
    epoch: tokio::time::Instant,
    /// Whether the bound was full for the whole grace since an assign last found half the places free.
    shedding: AtomicBool,
    bound: usize,
    /// Assigns waiting for a place now.
    waiting: AtomicUsize,
}

/// Counts one assign as waiting while it lives (a wait can end by its request being dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an assign was let in, or not.
#[derive(Debug)]
pub enum Admission<'a> {
    /// A place was free.
    AtOnce(tokio::sync::SemaphorePermit<'a>),
    /// The bound was full for less than the grace; a place came free before its end.
    AfterWaiting(tokio::sync::SemaphorePermit<'a>),
    /// The bound was full and stayed full for the grace (or had already been full that long, or the process
    /// sheds); `waited` when this assign waited for a place first.
    Refused { waited: bool },
}

impl AssignAdmission {
    pub fn new(bound: u32, grace: Duration) -> Self {
        let bound = usize::try_from(bound).unwrap_or(usize::MAX);
        Self {
            places: tokio::sync::Semaphore::new(bound),
            bound,
            shedding: AtomicBool::new(false),
            grace,
            last_free_ms: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A place for one assign, held until the returned permit is dropped, or a refusal.
    pub async fn admit(&self) -> Admission<'_> {
        if let Ok(place) = self.places.try_acquire() {
            self.last_free_ms.store(self.now_ms(), Ordering::Relaxed);
            // Half the places free (this one counted): the backlog is gone.
            if self.places.available_permits() + 1 >= self.bound.div_ceil(2) {
                self.shedding.store(false, Ordering::Relaxed);
            }
            return Admission::AtOnce(place);
        }
        if self.shedding.load(Ordering::Relaxed) {
            return Admission::Refused { waited: false };
        }
        let full_for = Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_free_ms.load(Ordering::Relaxed)),
        );
        let Some(left) = self
            .grace
            .checked_sub(full_for)
            .filter(|left| !left.is_zero())
        else {
            self.shedding.store(true, Ordering::Relaxed);
            return Admission::Refused { waited: false };
        };
        let _waiting = Waiting::new(&self.waiting);
        match tokio::time::timeout(left, self.places.acquire()).await {
            Ok(Ok(place)) => Admission::AfterWaiting(place),
            // Timed out (or closed, which this process never does).
            _ => {
                self.shedding.store(true, Ordering::Relaxed);
                Admission::Refused { waited: true }
            }
        }
    }

    /// Whether the process refuses, at once, every assign that finds the bound full (for tests).
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    /// Places free now (for tests).
    pub fn free(&self) -> usize {
        self.places.available_permits()
    }

    /// Assigns waiting for a place now (for tests).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// A limit of requests per key per minute, in this process (0 turns it off): `governor`'s GCRA, so a key may spend
/// its whole minute's budget at once and then earns one request back every `60 / per_minute` seconds.
///
/// Memory is bounded by the keys seen within the last minute: keys whose budget is whole again are dropped every
/// [`RateLimiter::SWEEP_EVERY`] checks, and IPv6 clients are counted per /64 (what one subscriber is usually
/// given), so that cycling through addresses of one network buys no extra budget and no extra memory.
pub struct RateLimiter {
    limiter: Option<governor::DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
}

/// A refusal: the key may try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up, at least 1 (the `Retry-After` header's unit).
    pub fn seconds(self) -> u64 {
        let whole = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        whole.max(1)
    }
}

impl RateLimiter {
    /// Keys whose budget is whole again are forgotten once per this many checks.
    pub const SWEEP_EVERY: u64 = 4096;

    pub fn new(per_minute: u32) -> Self {
        Self {
            limiter: std::num::NonZeroU32::new(per_minute).map(|per_minute| {
                governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute))
            }),
            checks: AtomicU64::new(0),
        }
    }

    /// Counts one request for `key`.
    ///
    /// # Errors
    /// The key is over its limit: when it may try again.
    pub fn check(&self, key: &str) -> Result<(), RetryAfter> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let checks = self.checks.fetch_add(1, Ordering::Relaxed);
        if checks % Self::SWEEP_EVERY == Self::SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(&key.to_string()).map_err(|not_until| {
            use governor::clock::Clock;
            RetryAfter(not_until.wait_time_from(limiter.clock().now()))
        })
    }

    /// Counts one request from a client address (IPv6 per /64).
    ///
    /// # Errors
    /// The address is over its limit: when it may try again.
    pub fn check_address(&self, address: std::net::IpAddr) -> Result<(), RetryAfter> {
        self.check(&address_key(address))
    }

    /// Keys remembered now (for tests of the bound).
    pub fn remembered_keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |limiter| limiter.len())
    }
}

/// The key an address is counted under: itself for IPv4, its /64 for IPv6.
fn address_key(address: std::net::IpAddr) -> String {
    match address.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let segments = v6.segments();
            format!(
                "{:x}:{:x}:{:x}:{:x}::/64",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Admission, AssignAdmission, CandidateHints, HostLocks, RateLimiter, CONTENDED_FOR,
        HINTS_FOR,
    };
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn hints_serve_their_region_and_release_for_hints_for_and_then_none() {
        let hints = CandidateHints::default();
        assert!(
            hints.recent("us-east-1", "abc").is_none(),
            "nothing read yet"
        );
        let hosts = Arc::new(vec![("i-1".to_string(), "10.0.0.1".to_string())]);
        hints.keep("us-east-1", "abc", hosts.clone());
        assert_eq!(hints.recent("us-east-1", "abc"), Some(hosts));
        assert!(
            hints.recent("us-east-1", "def").is_none(),
            "another release"
        );
        assert!(hints.recent("eu-west-1", "abc").is_none(), "another region");
        std::thread::sleep(HINTS_FOR);
        assert!(hints.recent("us-east-1", "abc").is_none(), "too old");
    }

    #[test]
    fn a_key_over_its_limit_is_refused_with_a_retry_time_and_others_are_not() {
        let limiter = RateLimiter::new(2);
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        let refused = limiter.check("a").expect_err("over the limit");
        assert!(
            (1..=30).contains(&refused.seconds()),
            "one request comes back every 30 s: {refused:?}"
        );
        assert!(limiter.check("b").is_ok());
    }

    #[test]
    fn a_limit_of_zero_turns_limiting_off() {
        let limiter = RateLimiter::new(0);
        assert!((0..1000).all(|_| limiter.check("a").is_ok()));
    }

    #[test]
    fn ipv6_clients_of_one_network_share_a_budget() {
        let limiter = RateLimiter::new(1);
        let first: std::net::IpAddr = "2001:db8:1:2::1".parse().expect("an address");
        let second: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().expect("an address");
        let elsewhere: std::net::IpAddr = "2001:db8:1:3::1".parse().expect("an address");
        assert!(limiter.check_address(first).is_ok());
        assert!(limiter.check_address(second).is_err());
        assert!(limiter.check_address(elsewhere).is_ok());
    }

    #[test]
    fn keys_whose_budget_is_whole_again_are_forgotten() {
        // 6,000 a minute: a key's budget is whole again 10 ms after its one request.
        let limiter = RateLimiter::new(6_000);
        for key in 0..RateLimiter::SWEEP_EVERY - 1 {
            assert!(limiter.check(&format!("key-{key}")).is_ok());
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(limiter.check("the sweep runs on this check").is_ok());
        assert!(
            limiter.remembered_keys() <= 1,
            "{} keys remembered",
            limiter.remembered_keys()
        );
    }

    #[test]
    fn a_host_is_contended_only_once_an_assign_lost_on_it_and_only_for_a_while() {
        let locks = HostLocks::default();
        assert!(!locks.is_contended("i-1"));
        locks.mark_contended("i-1");
        assert!(locks.is_contended("i-1"));
        assert!(!locks.is_contended("i-2"));
        if let Ok(mut contended) = locks.contended.lock() {
            contended.insert(
                "i-1".to_string(),
                std::time::Instant::now() - CONTENDED_FOR - std::time::Duration::from_millis(1),
            );
        }
        assert!(!locks.is_contended("i-1"));
    }

    #[test]
    fn contended_hosts_go_last_and_each_group_keeps_its_order() {
        let locks = HostLocks::default();
        let mut candidates: Vec<(String, ())> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| (id.to_string(), ()))
            .collect();
        locks.put_contended_last(&mut candidates);
        let order = |candidates: &[(String, ())]| {
            candidates
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join("")
        };
        assert_eq!(order(&candidates), "abcd");
        locks.mark_contended("a");
        locks.mark_contended("c");
        locks.put_contended_last(&mut candidates);
        assert_eq!(order(&candidates), "bdac");
    }
    #[tokio::test]
    async fn an_assign_that_finds_the_bound_full_in_a_stall_waits_for_the_place_that_frees() {
        let admission = Arc::new(AssignAdmission::new(1, Duration::from_secs(5)));
        let Admission::AtOnce(first) = admission.admit().await else {
            panic!("a free place is taken at once");
        };
        let waiter = admission.clone();
        let second =
            tokio::spawn(async move { matches!(waiter.admit().await, Admission::AfterWaiting(_)) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        assert!(
            second.await.expect("joins"),
            "the place freed within the grace goes to the one waiting"
        );
        assert_eq!(admission.free(), 1, "and comes back when it is done");
        assert_eq!(admission.waiting(), 0);
    }

    #[tokio::test]
    async fn once_the_bound_has_been_full_for_the_grace_an_assign_is_refused_at_once() {
        let admission = AssignAdmission::new(1, Duration::from_millis(100));
        let Admission::AtOnce(first) = admission.admit().await else {
            panic!("a free place is taken at once");
        };
        // Full since the first was let in: the second waits out what is left of the grace.
        assert!(matches!(
            admission.admit().await,
            Admission::Refused { waited: true }
        ));
        // Full for the whole grace now: overload, not a stall.
        assert!(matches!(
            admission.admit().await,
            Admission::Refused { waited: false }
        ));
        assert!(admission.is_shedding());
        drop(first);
        assert!(matches!(admission.admit().await, Admission::AtOnce(_)));
        assert!(!admission.is_shedding(), "half the places were free");
    }

    #[tokio::test]
    async fn a_process_that_sheds_goes_on_shedding_until_half_the_places_are_free() {
        let admission = AssignAdmission::new(4, Duration::from_millis(50));
        let mut held = Vec::new();
        for _ in 0..4 {
            let Admission::AtOnce(place) = admission.admit().await else {
                panic!("a free place is taken at once");
            };
            held.push(place);
        }
        assert!(matches!(
            admission.admit().await,
            Admission::Refused { waited: true }
        ));
        assert!(admission.is_shedding());
        // One place frees and is taken at once: still three of four in flight, so no wait is granted.
        held.pop();
        let Admission::AtOnce(place) = admission.admit().await else {
            panic!("a free place is taken at once");
        };
        held.push(place);
        assert!(admission.is_shedding());
        assert!(matches!(
            admission.admit().await,
            Admission::Refused { waited: false }
        ));
        // Two free of four: the backlog is gone, and a stall is waited out again.
        held.truncate(2);
        let Admission::AtOnce(place) = admission.admit().await else {
            panic!("a free place is taken at once");
        };
        assert!(!admission.is_shedding());
        drop(place);
    }

    #[tokio::test]
    async fn without_a_grace_an_assign_that_finds_the_bound_full_is_refused_at_once() {
        let admission = AssignAdmission::new(1, Duration::ZERO);
        let _first = admission.admit().await;
        assert!(matches!(
            admission.admit().await,
            Admission::Refused { waited: false }
        ));
    }
}
