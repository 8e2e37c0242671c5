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

/// The git commit this build was made from (`api/build.rs`; `unknown` outside a git checkout).
pub const GIT_COMMIT: &str = env!("WHIST_GIT_COMMIT");
/// The version and the commit, as `whist --version` prints them.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("WHIST_GIT_COMMIT"),
    ")"
);
pub use state::{AppState, Context};
