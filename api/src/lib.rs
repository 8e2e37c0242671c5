//! The HTTP surface of the Whist webserver, and the composition of a running process (`serve`, `worker`).
//!
//! Architecture invariant: handlers translate HTTP to commands and queries and back; they decide nothing. Domain
//! rejections become HTTP status codes in one place (`error`), failures are logged with their cause chain and
//! answered with a generic body.

pub mod admin;
pub mod allocation;
pub mod audit;
pub mod autoscaler;
pub mod background;
pub mod billing;
pub mod dashboard;
pub mod desktop;
pub mod entitlement;
pub mod error;
pub mod heartbeats;
pub mod hirefire;
pub mod host;
pub mod http_server;
pub mod job_outcomes;
pub mod middleware;
pub mod openapi;
pub mod operator;
pub mod ops;
pub mod reconciler;
pub mod release;
pub mod repair;
pub mod security;
pub mod services;
pub mod startup;
pub mod state;
pub mod sweeper;
pub mod telemetry;

pub use startup::Application;
pub use state::AppState;
