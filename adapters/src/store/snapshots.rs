//! Snapshots of our own: an aggregate's state after the event at some sequence, written beside the events every
//! [`SNAPSHOT_EVERY`] events (table `aggregate_snapshots`), so that a cold load reads the latest snapshot and the
//! events after it instead of the whole history. (cqrs-es 0.5's own snapshot modes apply every event twice.)
//!
//! A snapshot is derived data, never the truth: it is written after its events are committed (so it never holds
//! an event the store does not), a failed write only costs a longer load later, and a load uses a snapshot only
//! when the event it was taken at is still stored (a store restored to an earlier state may hold a snapshot's
//! sequence with other events, or none). The events after a snapshot are upcast as every read upcasts them.

use cqrs_es::Aggregate;

use super::database::Backend;

/// Events between two snapshots of one aggregate: a cold load reads at most this many events after the latest one.
pub const SNAPSHOT_EVERY: usize = 500;

/// The shape of every aggregate's state as this binary writes it. Snapshots of another shape are ignored (a longer
/// load, once, then a new snapshot). It changes whenever any aggregate's state changes shape: the test
/// `every_state_shape_is_pinned` fails until it does.
pub const STATE_VERSION: &str = "1";

/// Whether a commit that moved an aggregate from `before` to `after` crosses a snapshot point.
pub fn due(before: usize, after: usize) -> bool {
    after / SNAPSHOT_EVERY > before / SNAPSHOT_EVERY
}

/// Reads and writes snapshots in the store's database, through the pool its events are read through (so that a
/// cold load takes connections from one pool only).
#[derive(Clone, Debug)]
pub(crate) struct Snapshots {
    pool: Backend,
}

const READ: &str = "SELECT sequence, state FROM aggregate_snapshots \
                    WHERE aggregate_type = $1 AND aggregate_id = $2 AND state_version = $3";

const WRITE: &str = "INSERT INTO aggregate_snapshots (aggregate_type, aggregate_id, sequence, state_version, state) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                     SET sequence = excluded.sequence, state_version = excluded.state_version, state = excluded.state \
                     WHERE aggregate_snapshots.sequence < excluded.sequence \
                        OR aggregate_snapshots.state_version <> excluded.state_version";

/// Runs `$run` with `$query` bound to whichever pool `$backend` holds (the same code for both backends).
macro_rules! on_backend {
    ($backend:expr, |$query:ident| $run:expr) => {
        match $backend {
            Backend::Postgres(pool) => {
                let $query = pool;
                $run
            }
            Backend::Sqlite(pool) => {
                let $query = pool;
                $run
            }
        }
    };
}

impl Snapshots {
    pub(crate) fn new(pool: Backend) -> Self {
        Self { pool }
    }

    /// The latest snapshot of the aggregate in this binary's state shape, and the sequence it was taken at. A
    /// snapshot of another shape, or one that does not read as the state, is no snapshot.
    ///
    /// # Errors
    /// The database failed.
    pub(crate) async fn read<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<(usize, A)>, sqlx::Error> {
        let row: Option<(i64, String)> = on_backend!(&self.pool, |pool| {
            sqlx::query_as(READ)
                .bind(A::TYPE)
                .bind(aggregate_id)
                .bind(STATE_VERSION)
                .fetch_optional(pool)
                .await?
        });
        let Some((sequence, state)) = row else {
            return Ok(None);
        };
        match (usize::try_from(sequence), serde_json::from_str::<A>(&state)) {
            (Ok(sequence), Ok(state)) if sequence > 0 => Ok(Some((sequence, state))),
            (_, Err(error)) => {
                tracing::warn!(aggregate = A::TYPE, aggregate_id, error = %error,
                    "a snapshot does not read as the state; loading the whole history");
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Writes `state`, taken after the event at `sequence`, in the background (a later snapshot is never replaced
    /// by an earlier one). A failure is logged: it only makes a later load longer.
    pub(crate) fn write<A: Aggregate>(&self, aggregate_id: &str, sequence: usize, state: &A) {
        let state = match serde_json::to_string(state) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(aggregate = A::TYPE, aggregate_id, error = %error, "a snapshot could not be written");
                return;
            }
        };
        let Ok(sequence) = i64::try_from(sequence) else {
            return;
        };
        let pool = self.pool.clone();
        let aggregate_id = aggregate_id.to_string();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let written = on_backend!(&pool, |pool| {
                sqlx::query(WRITE)
                    .bind(A::TYPE)
                    .bind(&aggregate_id)
                    .bind(sequence)
                    .bind(STATE_VERSION)
                    .bind(&state)
                    .execute(pool)
                    .await
                    .map(|_| ())
            });
            match written {
                Ok(()) => {
                    metrics::counter!("whist_snapshots_written_total", "aggregate" => A::TYPE)
                        .increment(1)
                }
                Err(error) => tracing::warn!(aggregate = A::TYPE, aggregate_id, error = %error,
                    "a snapshot could not be written"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{due, SNAPSHOT_EVERY};

    #[test]
    fn a_snapshot_is_due_each_time_a_commit_crosses_a_multiple_of_the_interval() {
        assert!(!due(0, SNAPSHOT_EVERY - 1));
        assert!(due(SNAPSHOT_EVERY - 1, SNAPSHOT_EVERY));
        assert!(
            due(SNAPSHOT_EVERY - 2, SNAPSHOT_EVERY + 3),
            "a unit of several events"
        );
        assert!(!due(SNAPSHOT_EVERY, SNAPSHOT_EVERY + 1));
    }
}

#[cfg(test)]
mod state_shapes {
    use cqrs_es::Aggregate;

    fn shape<A: Aggregate>() -> String {
        let state = serde_json::to_value(A::default()).unwrap_or_default();
        let mut fields: Vec<&str> = state
            .as_object()
            .map(|object| object.keys().map(String::as_str).collect())
            .unwrap_or_default();
        fields.sort_unstable();
        format!("{}: {}", A::TYPE, fields.join(" "))
    }

    /// The fields of every aggregate's state as snapshots store it. A change here is a change of shape: bump
    /// `STATE_VERSION` with it, so that snapshots of the old shape are ignored instead of read wrongly.
    #[test]
    fn every_state_shape_is_pinned() {
        use whist_domain::{
            assign_key::AssignKey,
            images::ImageCatalog,
            instance::Instance,
            leadership::Leadership,
            mandelbox::Mandelbox,
            probe::Probe,
            service::Service,
            session::Session,
            subscription::{StripeCustomer, Subscription},
            user::User,
        };
        let shapes = [
            shape::<AssignKey>(),
            shape::<ImageCatalog>(),
            shape::<Instance>(),
            shape::<Leadership>(),
            shape::<Mandelbox>(),
            shape::<Probe>(),
            shape::<Service>(),
            shape::<Session>(),
            shape::<Subscription>(),
            shape::<StripeCustomer>(),
            shape::<User>(),
        ];
        assert_eq!(super::STATE_VERSION, "1", "pinned with the shapes below");
        assert_eq!(shapes, PINNED, "{shapes:#?}");
    }

    const PINNED: [&str; 11] = [
        "assign_key: answer",
        "image_catalog: active preparations prepared retired_hashes",
        "instance: auth_token_hash bootstrap_token_hash capacity cloud_instance_id ip launch_requested_at \
         mandelboxes spec status status_before_silence strays_terminated termination_reason tls_cert_sha256",
        "leadership: epoch holder taken_at",
        "mandelbox: allocated_at end_reason ended_at placement protocol_secret_hash spun_up_at status",
        "probe: increments total",
        "service: changed_at maintenance",
        "session: connected_at mandelbox_id requested_at status user_id",
        "subscription: customer_id ever_subscribed seen_events status status_order subscription_id",
        "stripe_customer: held user_id",
        "user: live_mandelboxes",
    ];
}
