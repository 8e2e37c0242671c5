//! Background work: the reconciler (side-effect jobs on hosts and clouds, with its batched outcomes), the
//! autoscaler with the repair its leader runs, the sweeper, the heartbeat book, and the supervisor that starts them
//! all and restarts any that dies. Workers take a [`Context`], never the HTTP state.
//!
//! Architecture invariant: nothing here imports `crate::http`.
//!
//! [`Context`]: crate::state::Context

pub mod autoscaler;
pub mod background;
pub mod heartbeats;
pub mod job_outcomes;
pub mod reconciler;
pub mod repair;
pub mod sweeper;
