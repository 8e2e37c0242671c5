//! Every metric this server exports on `/metrics`, in one list: its name, type, unit, `# HELP` text and, for a
//! histogram, its buckets.
//!
//! The call sites (`metrics::counter!`, `gauge!`, `histogram!` in `adapters/`, `projections/` and `api/`) name
//! their metric by the same literal, so that a name is found by grep; `tests/suite/metrics.rs` checks that every
//! call site's name is listed here with its type, and that every name listed here has a call site. Names follow
//! Prometheus's conventions: a base unit in the name (`_seconds`; `_events`, `_units` or `_jobs` for what a count
//! counts), `_total` on counters only, `_info` for a constant 1 that carries labels.

use metrics::{KeyName, Recorder, SharedString, Unit};

/// Latencies, in seconds: from 1 ms to 10 s (an HTTP client gives up on a request head after 15 s).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Sizes of batches, in whatever the batch counts: powers of two up to 1,024 (the append batcher's most events
/// per statement; the job outcome writer's most is 256).
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A metric's Prometheus type; a histogram with its buckets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

impl Kind {
    /// The type as `# TYPE` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }
}

/// One metric: its name, type, unit (where one applies) and the `# HELP` text (labels named in it).
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Counter,
        unit: Some(Unit::Count),
        help,
    }
}

const fn gauge(name: &'static str, unit: Option<Unit>, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Gauge,
        unit,
        help,
    }
}

const fn seconds(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram(SECONDS_BUCKETS),
        unit: Some(Unit::Seconds),
        help,
    }
}

const fn batch(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: Kind::Histogram(COUNT_BUCKETS),
        unit: Some(Unit::Count),
        help,
    }
}

/// The build a process runs (set once, when the recorder is installed).
pub const BUILD_INFO: &str = "whist_build_info";

/// Every metric, grouped by where it is recorded.
pub const CATALOGUE: &[Metric] = &[
    // The process.
    gauge(
        BUILD_INFO,
        None,
        "The build this process runs, by version and git_commit; always 1.",
    ),
    // HTTP (api/src/http/).
    counter(
        "whist_http_requests_total",
        "HTTP requests answered, by method, route (the route's template, or unmatched) and status.",
    ),
    seconds(
        "whist_http_request_duration_seconds",
        "Time from a request's arrival to its answer, by method and route.",
    ),
    counter(
        "whist_auth_refusals_total",
        "Bearer tokens refused (expired, badly signed, wrong audience or issuer).",
    ),
    counter(
        "whist_stripe_webhooks_total",
        "Stripe webhooks received, by outcome: recorded, ignored, refused (bad signature) or failed.",
    ),
    // Assigns (api/src/http/desktop.rs, api/src/control/assign.rs).
    counter(
        "whist_assigns_total",
        "Assign requests answered, by outcome: assigned, rate_limited, overloaded (more at once than WHIST_ASSIGN_CONCURRENCY, for longer than WHIST_ASSIGN_QUEUE_MS), payment_required, failed, or the refusal's code.",
    ),
    counter(
        "whist_assign_admission_waits_total",
        "Assigns that found WHIST_ASSIGN_CONCURRENCY assigns in flight and waited for a place (the bound full for less than WHIST_ASSIGN_QUEUE_MS), by outcome: admitted, or refused when the wait ran out.",
    ),
    seconds(
        "whist_assign_seconds",
        "Time an assign took, from its subscription check passing to its answer.",
    ),
    seconds(
        "whist_assign_phase_seconds",
        "Time spent in one phase of an assign, by phase: user, candidates, recheck (the hosts passed over, read fresh together), host_lock, commit.",
    ),
    counter(
        "whist_assign_conflicts_total",
        "Assign attempts that lost a race for a host or an aggregate to another writer and were tried again.",
    ),
    counter(
        "whist_assigns_retried_total",
        "Assigns whose first attempt did not stand (a race lost to another writer, or a copy found stale) and that \
         were decided again.",
    ),
    counter(
        "whist_assign_replays_total",
        "Assigns answered from an earlier assign with the same Idempotency-Key.",
    ),
    // Workers (api/src/workers/).
    counter(
        "whist_heartbeats_total",
        "Host heartbeats received by this process.",
    ),
    counter(
        "whist_jobs_total",
        "Job outcomes the reconciler recorded, by kind and status: done, pending (to be retried) or failed.",
    ),
    batch(
        "whist_job_outcome_batch_jobs",
        "Job outcomes written per statement by the outcome writer.",
    ),
    gauge(
        "whist_free_mandelboxes",
        Some(Unit::Count),
        "Free mandelbox slots the autoscaler counted at its last pass, by region.",
    ),
    gauge(
        "whist_sweep_braked",
        None,
        "1 while the sweeper ends no host of the region because too many of its hosts fell silent at once, by region.",
    ),
    // Projections (projections/src/runner.rs; the lag at each scrape, api/src/http/ops.rs).
    gauge(
        "whist_projection_lag_events",
        Some(Unit::Count),
        "Events in the log the projection has not applied yet, by projection.",
    ),
    gauge(
        "whist_projection_position",
        None,
        "Position in the log of the last event the projection applied in this process, by projection.",
    ),
    gauge(
        "whist_projection_waiting",
        None,
        "1 while the projection waits before an event a newer binary wrote, by projection.",
    ),
    // Background loops (adapters/src/supervision.rs).
    gauge(
        "whist_background_loop_up",
        None,
        "1 while the background loop runs, 0 while it waits to be restarted, by loop.",
    ),
    counter(
        "whist_background_loop_restarts_total",
        "Restarts of a background loop after it panicked or ended early, by loop.",
    ),
    // The store (adapters/src/store/).
    counter(
        "whist_commands_total",
        "Commands executed, by aggregate type and outcome: recorded, rejected, conflict or failed.",
    ),
    counter(
        "whist_units_total",
        "Units of work committed together, by outcome: recorded, conflict or failed.",
    ),
    batch(
        "whist_append_batch_units",
        "Units of work appended per statement by the append batcher.",
    ),
    counter(
        "whist_aggregate_loads_total",
        "Aggregates read from the store rather than served from memory, by aggregate type and from: snapshot, history, or catch_up (a remembered copy brought up to date).",
    ),
    counter(
        "whist_remembered_copies_total",
        "Looks for a remembered copy of an aggregate, by aggregate type and outcome: hit or miss.",
    ),
    counter(
        "whist_as_of_log_loads_total",
        "Reads of an aggregate as of the log, by aggregate type and how: followed (the remembered copy, kept current by the log follower) or caught_up (the follower was behind its bound, so the copy was brought up to date by a read).",
    ),
    counter(
        "whist_copies_marked_stale_total",
        "Remembered aggregate copies marked behind the store, by aggregate type and why: conflict, followed (the log follower read an event newer than the copy: another process's, or under load this process's own before the commit that recorded it was remembered, which then replaces the copy), decided_again, unit_reads_fresh, asked (a read caught up), presumed_new.",
    ),
    counter(
        "whist_catch_up_reads_total",
        "Statements that read the events after known versions (remembered copies brought up to date, one or many at once, or a snapshot continued), by aggregate type.",
    ),
    counter(
        "whist_catch_up_events_total",
        "Events applied to a remembered copy that other processes appended since it was remembered, by aggregate type.",
    ),
    counter(
        "whist_snapshots_written_total",
        "Snapshots written, by aggregate type.",
    ),
    counter(
        "whist_log_rewinds_total",
        "Times this process saw the log's head move back (a failover to a standby that lagged, a restore).",
    ),
];

/// Gives `recorder` the `# HELP` text and unit of every metric in [`CATALOGUE`].
pub fn describe_all(recorder: &impl Recorder) {
    for metric in CATALOGUE {
        let name = KeyName::from_const_str(metric.name);
        let help = SharedString::const_str(metric.help);
        match metric.kind {
            Kind::Counter => recorder.describe_counter(name, metric.unit, help),
            Kind::Gauge => recorder.describe_gauge(name, metric.unit, help),
            Kind::Histogram(_) => recorder.describe_histogram(name, metric.unit, help),
        }
    }
}

/// The metric named `name`, if it is in the catalogue.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|metric| metric.name == name)
}
