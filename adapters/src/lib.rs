//! Adapters: everything that talks to the outside world.
//!
//! Architecture invariant: adapters carry facts in and out; they make no business decision. What an adapter learns
//! (an EC2 id, a Stripe status) goes back to the domain inside a command.

pub mod auth;
pub mod config;
pub mod ec2;
pub mod host_client;
pub mod simulated_host;
pub mod store;
pub mod stripe;
pub mod supervision;
pub mod tls;
pub mod tokens;
pub mod trace_context;
