//! One TLS crypto provider for the whole process.
//!
//! rustls 0.23 picks its provider from its enabled features; with both `ring` (reqwest, async-stripe) and
//! `aws-lc-rs` (aws-sdk-ec2) compiled in it cannot choose and panics the first time a client builds a TLS
//! configuration. Every constructor of an HTTPS client here calls `ensure_crypto_provider` first.

use std::sync::Once;

static INSTALL: Once = Once::new();

/// Installs ring as the process's default provider, once; harmless when one is already installed.
pub fn ensure_crypto_provider() {
    INSTALL.call_once(|| {
        // Err means another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
