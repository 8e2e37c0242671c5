//! The Whist domain: aggregates that take commands and emit events.
//!
//! Architecture invariant: nothing in this crate performs I/O. A decision depends only on the aggregate's state
//! and the command; facts from outside (an EC2 id, a Stripe status, the current time) arrive inside commands.

pub mod assign_key;
pub mod decide;
pub mod decisions;
pub mod images;
pub mod instance;
pub mod leadership;
pub mod mandelbox;
pub mod metadata;
pub mod probe;
pub mod scaling;
pub mod service;
pub mod session;
pub mod subscription;
pub mod user;
pub mod versions;

pub use decide::Decide;
pub use metadata::{Actor, Cause, EventMetadata};
