//! The HTTP surface: poem routes, the request middleware, the OpenAPI document, the one mapping from outcomes to
//! HTTP answers, the operator page, and the HTTP/1.1 server under them. Handlers translate HTTP into calls of
//! `crate::control` and back; they decide nothing.

pub mod admin;
pub mod billing;
pub mod dashboard;
pub mod desktop;
pub mod error;
pub mod hirefire;
pub mod host;
pub mod middleware;
pub mod openapi;
pub mod ops;
pub mod security;
pub mod server;
