//! The HTTP surface of the Whist webserver, and the composition of a running process (`serve`, `worker`).
//!
//! Architecture invariant: handlers translate HTTP to commands and queries and back; they decide nothing. Domain
//! rejections become HTTP status codes in one place (`error`), failures are logged with their cause chain and
//! answered with a generic body.

pub mod control;
pub mod http;
pub mod services;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod traces;
pub mod workers;

pub use startup::Application;
pub use state::{AppState, Context};
