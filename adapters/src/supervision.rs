//! Supervised background loops.
//!
//! A process keeps its decisions moving with loops that run for as long as the process does: the projections, the
//! reconciler, the sweeper, the autoscaler, the heartbeat flusher, the append batcher's flushers and the log
//! listener. A bug that panics in one of them, or a loop that returns when it should not, would otherwise leave the
//! process up and answering while part of it has silently stopped. Each loop therefore runs under a supervisor that
//! restarts it, after a delay that doubles from [`FIRST_RESTART_DELAY`] up to [`LONGEST_RESTART_DELAY`], whenever
//! it ends while its owner has not asked it to stop. The standing of every loop is kept in [`BackgroundLoops`], so
//! that readiness (`GET /readyz`) can answer 503 naming a loop while it is down.
//!
//! A loop is restarted by calling its factory again: the supervisor is given a closure that builds the loop's future
//! from a shutdown receiver, not the future itself, which can be run only once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The delay before the first restart of a loop that stopped.
pub const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);

/// The longest delay between restarts of a loop that keeps stopping.
pub const LONGEST_RESTART_DELAY: Duration = Duration::from_secs(10);

/// A run that lasted this long counts as healthy: should the loop stop after it, the delays start again from
/// [`FIRST_RESTART_DELAY`] instead of going on from where an earlier run of failures left them.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// How long after the fault injection is decided the named loop panics (`WHIST_FAULT_PANIC_LOOP`): long enough
/// for the loop to have started its work, and for a test that started the process to be watching.
pub const INJECTED_FAULT_DELAY: Duration = Duration::from_secs(2);

/// The standing of every supervised loop of one process. Clones share it.
#[derive(Clone, Debug)]
pub struct BackgroundLoops {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    standings: Mutex<BTreeMap<&'static str, Standing>>,
    /// Which loop, if any, is to panic once (`None` until the process has read its settings).
    fault: watch::Sender<Option<FaultInjection>>,
    /// Whether the injected fault has fired (it fires once per process).
    fault_fired: AtomicBool,
}

/// The fault to inject, once decided.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FaultInjection {
    None,
    PanicOnce { loop_name: String },
}

/// One loop's standing. A name can be run by several supervised tasks at once (the append batcher's flushers);
/// the loop counts as down while any of them is.
#[derive(Debug, Default, Clone, Copy)]
struct Standing {
    running: usize,
    down: usize,
    restarts: u64,
}

impl Default for BackgroundLoops {
    fn default() -> Self {
        Self::new()
    }
}

impl BackgroundLoops {
    /// A registry with no loop yet, and no decision yet about fault injection.
    pub fn new() -> Self {
        let (fault, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                standings: Mutex::new(BTreeMap::new()),
                fault,
                fault_fired: AtomicBool::new(false),
            }),
        }
    }

    /// Decides the fault injection of this process (`WHIST_FAULT_PANIC_LOOP`): the loop named `loop_name`, if any,
    /// panics once, [`INJECTED_FAULT_DELAY`] after this decision or after its start, whichever is later. Loops may
    /// start before the decision is made (the append batcher starts with the store): they wait for it beside
    /// their work. The first decision stands; later ones (another state over the same store) change nothing.
    pub fn decide_fault_injection(&self, loop_name: Option<String>) {
        let injection = match loop_name.filter(|name| !name.is_empty()) {
            Some(loop_name) => FaultInjection::PanicOnce { loop_name },
            None => FaultInjection::None,
        };
        let announced = injection.clone();
        let decided = self.inner.fault.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(injection);
            true
        });
        if let (true, FaultInjection::PanicOnce { loop_name }) = (decided, announced) {
            tracing::warn!(
                background_loop = loop_name,
                "fault injection: this background loop will panic once (WHIST_FAULT_PANIC_LOOP)"
            );
        }
    }

    /// The loops that are down at this moment (stopped, waiting to be restarted), by name.
    pub fn down(&self) -> Vec<&'static str> {
        self.standings()
            .into_iter()
            .filter(|(_, standing)| standing.down > 0)
            .map(|(name, _)| name)
            .collect()
    }

    /// How many times the loop named `name` has been restarted in this process.
    pub fn restarts(&self, name: &str) -> u64 {
        self.standings()
            .get(name)
            .map_or(0, |standing| standing.restarts)
    }

    /// The names of the loops supervised at this moment.
    pub fn running(&self) -> Vec<&'static str> {
        self.standings()
            .into_iter()
            .filter(|(_, standing)| standing.running > 0)
            .map(|(name, _)| name)
            .collect()
    }

    fn standings(&self) -> BTreeMap<&'static str, Standing> {
        // A panic while the lock was held cannot leave a standing half written (each update is one field), so a
        // poisoned lock still holds the truth.
        match self.inner.standings.lock() {
            Ok(standings) => standings.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn update(&self, name: &'static str, change: impl FnOnce(&mut Standing)) {
        let mut standings = match self.inner.standings.lock() {
            Ok(standings) => standings,
            Err(poisoned) => poisoned.into_inner(),
        };
        let standing = standings.entry(name).or_default();
        change(standing);
        let up = if standing.down == 0 { 1.0 } else { 0.0 };
        metrics::gauge!("whist_background_loop_up", "loop" => name).set(up);
    }

    /// Runs the loop `name` in a task of its own, built by `start` from a shutdown receiver, and restarts it with
    /// backoff whenever it panics or ends before `shutdown` turns true (or its sender is dropped, which means that
    /// nobody can ask the loop to stop any more: its owner is gone). The returned task ends once the loop has
    /// ended after being asked to stop.
    pub fn supervise<Start, Run>(
        &self,
        name: &'static str,
        shutdown: watch::Receiver<bool>,
        mut start: Start,
    ) -> JoinHandle<()>
    where
        Start: FnMut(watch::Receiver<bool>) -> Run + Send + 'static,
        Run: Future<Output = ()> + Send + 'static,
    {
        let loops = self.clone();
        loops.update(name, |standing| standing.running += 1);
        tokio::spawn(async move {
            let mut shutdown = shutdown;
            let mut delay = FIRST_RESTART_DELAY;
            loop {
                let started = Instant::now();
                let run = loops
                    .clone()
                    .with_fault_injection(name, start(shutdown.clone()));
                let ended = tokio::spawn(run).await;
                if stopping(&shutdown) {
                    loops.update(name, |standing| standing.running -= 1);
                    return;
                }
                if started.elapsed() >= HEALTHY_RUN {
                    delay = FIRST_RESTART_DELAY;
                }
                let why = match ended {
                    Ok(()) => "it ended on its own".to_string(),
                    Err(error) if error.is_panic() => {
                        format!("it panicked: {}", panic_message(error.into_panic()))
                    }
                    Err(_) => "its task was cancelled".to_string(),
                };
                loops.update(name, |standing| standing.down += 1);
                tracing::error!(
                    background_loop = name,
                    why,
                    restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "a background loop stopped while the process was not shutting down; restarting it"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|stop| *stop) => {
                        loops.update(name, |standing| {
                            standing.down -= 1;
                            standing.running -= 1;
                        });
                        return;
                    }
                }
                delay = next_restart_delay(delay);
                loops.update(name, |standing| {
                    standing.down -= 1;
                    standing.restarts += 1;
                });
                metrics::counter!("whist_background_loop_restarts_total", "loop" => name)
                    .increment(1);
                tracing::info!(background_loop = name, "background loop restarted");
            }
        })
    }

    /// `run`, made to panic once [`INJECTED_FAULT_DELAY`] after it starts when the fault injection names `name`
    /// and has not fired yet. Until the fault injection is decided, the loop runs and the decision is awaited
    /// beside it.
    async fn with_fault_injection(self, name: &'static str, run: impl Future<Output = ()>) {
        let mut run = std::pin::pin!(run);
        let mut decision = self.inner.fault.subscribe();
        let targeted = tokio::select! {
            () = &mut run => return,
            decided = decision.wait_for(Option::is_some) => decided.is_ok_and(|injection| {
                matches!(&*injection, Some(FaultInjection::PanicOnce { loop_name }) if loop_name == name)
            }),
        };
        if targeted && !self.inner.fault_fired.load(Ordering::SeqCst) {
            tokio::select! {
                () = &mut run => return,
                _ = tokio::time::sleep(INJECTED_FAULT_DELAY) => {}
            }
            if !self.inner.fault_fired.swap(true, Ordering::SeqCst) {
                panic!(
                    "injected fault: background loop {name} panics once (WHIST_FAULT_PANIC_LOOP)"
                );
            }
        }
        run.await;
    }
}

/// The delay after `delay`: twice as long, up to [`LONGEST_RESTART_DELAY`].
fn next_restart_delay(delay: Duration) -> Duration {
    (delay * 2).min(LONGEST_RESTART_DELAY)
}

/// Whether the owner of `shutdown` asked to stop, or can no longer ask (its sender is gone).
pub fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// The message a panic carried, as far as it can be read.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_string(),
            Err(_) => "(no message)".to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Waits in real time: these tests run the supervisor as it runs in a process.
    async fn pause(duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    #[test]
    fn the_restart_delay_doubles_from_a_tenth_of_a_second_up_to_ten_seconds() {
        let mut delays = vec![FIRST_RESTART_DELAY];
        for _ in 0..8 {
            delays.push(next_restart_delay(delays[delays.len() - 1]));
        }
        let milliseconds: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(
            milliseconds,
            [100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000]
        );
    }

    #[tokio::test]
    async fn a_loop_that_panics_is_down_until_its_restart_and_then_counted_as_restarted() {
        let loops = BackgroundLoops::new();
        loops.decide_fault_injection(None);
        let (stop, shutdown) = watch::channel(false);
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let task = loops.supervise("flaky", shutdown, move |mut shutdown| {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    panic!("the first run fails");
                }
                let _ = shutdown.wait_for(|stop| *stop).await;
            }
        });
        pause(FIRST_RESTART_DELAY / 4).await;
        assert_eq!(loops.down(), vec!["flaky"]);
        pause(FIRST_RESTART_DELAY * 3).await;
        assert!(loops.down().is_empty());
        assert_eq!(loops.restarts("flaky"), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        let _ = stop.send(true);
        task.await.expect("the supervisor ends");
        assert!(loops.running().is_empty());
    }

    #[tokio::test]
    async fn a_loop_that_ends_on_its_own_is_restarted_too() {
        let loops = BackgroundLoops::new();
        loops.decide_fault_injection(None);
        let (_stop, shutdown) = watch::channel(false);
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let _task = loops.supervise("hasty", shutdown, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        // Runs at 0, 0.1 and 0.3 s; the next at 0.7 s.
        pause(Duration::from_millis(500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(loops.restarts("hasty"), 2);
    }

    #[tokio::test]
    async fn a_loop_that_ends_when_asked_to_stop_is_not_restarted() {
        let loops = BackgroundLoops::new();
        let (stop, shutdown) = watch::channel(false);
        let task = loops.supervise("polite", shutdown, |mut shutdown| async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        let _ = stop.send(true);
        task.await.expect("the supervisor ends");
        assert_eq!(loops.restarts("polite"), 0);
        assert!(loops.down().is_empty());
    }

    #[tokio::test]
    async fn a_loop_whose_owner_is_gone_is_not_restarted() {
        let loops = BackgroundLoops::new();
        let (stop, shutdown) = watch::channel(false);
        let task = loops.supervise("orphan", shutdown, |mut shutdown| async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        drop(stop);
        task.await.expect("the supervisor ends");
        assert_eq!(loops.restarts("orphan"), 0);
    }

    #[tokio::test]
    async fn the_injected_fault_panics_the_named_loop_once_even_when_decided_after_it_started() {
        let loops = BackgroundLoops::new();
        let (_stop, shutdown) = watch::channel(false);
        let _named = loops.supervise("named", shutdown.clone(), |mut shutdown| async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        let _other = loops.supervise("other", shutdown, |mut shutdown| async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        pause(Duration::from_millis(200)).await;
        loops.decide_fault_injection(Some("named".to_string()));
        // A later decision changes nothing.
        loops.decide_fault_injection(None);
        pause(INJECTED_FAULT_DELAY + FIRST_RESTART_DELAY / 4).await;
        assert_eq!(loops.down(), vec!["named"]);
        pause(FIRST_RESTART_DELAY * 3).await;
        assert!(loops.down().is_empty());
        assert_eq!(loops.restarts("named"), 1);
        assert_eq!(loops.restarts("other"), 0);
    }
}
