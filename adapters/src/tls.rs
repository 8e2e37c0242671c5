//! TLS: one crypto provider for the whole process, the host-service trust (pinned certificates or a CA), and the
//! certificates simulated hosts and tests serve.
//!
//! One TLS crypto provider for the whole process.
//!
//! rustls 0.23 picks its provider from its enabled features; with both `ring` (reqwest, async-stripe) and
//! `aws-lc-rs` (aws-sdk-ec2) compiled in it cannot choose and panics the first time a client builds a TLS
//! configuration. Every constructor of an HTTPS client here calls `ensure_crypto_provider` first.

use std::sync::{Arc, Once};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

static INSTALL: Once = Once::new();

/// Installs ring as the process's default provider, once; harmless when one is already installed.
pub fn ensure_crypto_provider() {
    INSTALL.call_once(|| {
        // Err means another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A PEM text that holds no certificate, or a certificate that cannot be a trust anchor.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PemError(String);

/// The certificates of a PEM text (`-----BEGIN CERTIFICATE-----` blocks), each usable as a trust anchor.
///
/// # Errors
/// The text holds no certificate, a block is malformed, or a certificate cannot be parsed as a trust anchor.
pub fn certificates_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| PemError(format!("not PEM certificates: {error}")))?;
    if certificates.is_empty() {
        return Err(PemError("no certificate in the PEM text".to_string()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for certificate in &certificates {
        roots
            .add(certificate.clone())
            .map_err(|error| PemError(format!("a certificate is not a usable CA: {error}")))?;
    }
    Ok(certificates)
}

/// Lowercase hex SHA-256 of a DER certificate: the fingerprint a host service registers.
pub fn certificate_sha256(certificate: &[u8]) -> String {
    hex::encode(Sha256::digest(certificate))
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that accepts servers whose certificate chains to one of `authorities` and names the
/// address or name called (nothing from the public web roots).
pub fn client_config_trusting(authorities: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    // Checked when the settings were read (`certificates_from_pem`).
    let _ = roots.add_parsable_certificates(authorities.iter().cloned());
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| rustls::ClientConfig::builder())
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A client configuration that accepts exactly one server certificate: the one whose SHA-256 is `pin` (lowercase
/// hex), whoever issued it and whatever names it. The handshake's signature is still checked against that
/// certificate's key, so a server that merely replays the certificate without its key is refused.
pub fn client_config_pinned(pin: &str) -> rustls::ClientConfig {
    let provider = ring();
    let verifier = PinnedCertificate {
        pin: pin.to_ascii_lowercase(),
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| rustls::ClientConfig::builder())
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// The certificate a host presented is not the one it registered.
#[derive(thiserror::Error)]
#[error(
    "the host's certificate (sha256 {presented}) is not the one it registered (sha256 {pinned})"
)]
struct PinMismatch {
    presented: String,
    pinned: String,
}

/// As the message: rustls shows the cause of a refused certificate with `Debug`.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, formatter)
    }
}

/// Accepts the one certificate whose fingerprint is pinned.
#[derive(Debug)]
struct PinnedCertificate {
    pin: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = certificate_sha256(end_entity.as_ref());
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    presented,
                    pinned: self.pin.clone(),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An error and every error under it, joined (`reqwest` says only "error sending request" at the top; the
/// certificate refusal is several sources down).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A certificate and its key, in PEM, as a TLS server serves them.
#[derive(Clone)]
pub struct ServerIdentity {
    pub certificate_pem: String,
    pub key_pem: String,
    /// Lowercase hex SHA-256 of the certificate's DER.
    pub sha256: String,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ServerIdentity")
            .field("sha256", &self.sha256)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl ServerIdentity {
    /// A new key and a self-signed certificate naming `address` (what a host service without a CA serves; the
    /// webserver pins its fingerprint).
    ///
    /// # Errors
    /// The key or certificate could not be made.
    pub fn self_signed(address: std::net::IpAddr) -> Result<Self, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let certificate = leaf_parameters(address)?.self_signed(&key)?;
        Ok(Self::from_parts(&certificate, &key))
    }

    /// What a poem listener serves this identity with (`TcpListener::bind(…).rustls(…)`).
    pub fn listener_config(&self) -> poem::listener::RustlsConfig {
        poem::listener::RustlsConfig::new().fallback(
            poem::listener::RustlsCertificate::new()
                .cert(self.certificate_pem.clone())
                .key(self.key_pem.clone()),
        )
    }

    fn from_parts(certificate: &rcgen::Certificate, key: &rcgen::KeyPair) -> Self {
        Self {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
            sha256: certificate_sha256(certificate.der()),
        }
    }
}

/// A server certificate's parameters: valid for a day either side of now, naming `address`.
fn leaf_parameters(address: std::net::IpAddr) -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut parameters = rcgen::CertificateParams::new(Vec::<String>::new())?;
    parameters.subject_alt_names = vec![rcgen::SanType::IpAddress(address)];
    parameters
        .distinguished_name
        .push(rcgen::DnType::CommonName, address.to_string());
    let now = time::OffsetDateTime::now_utc();
    parameters.not_before = now - time::Duration::days(1);
    parameters.not_after = now + time::Duration::days(30);
    Ok(parameters)
}

/// A certificate authority that issues server certificates: what an operator's host-service CA is, made here for
/// tests and rehearsals.
pub struct Authority {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Authority {
    /// A new CA named `name`.
    ///
    /// # Errors
    /// The key or certificate could not be made.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut parameters = rcgen::CertificateParams::new(Vec::<String>::new())?;
        parameters.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        parameters
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        parameters.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let certificate = parameters.self_signed(&key)?;
        Ok(Self { certificate, key })
    }

    /// The CA's certificate, in PEM (what `HOST_SERVICE_CA_PEM` or `sslrootcert` holds).
    pub fn certificate_pem(&self) -> String {
        self.certificate.pem()
    }

    /// A server certificate for `names` (IP addresses or DNS names) issued by this CA, with a new key.
    ///
    /// # Errors
    /// The key or certificate could not be made.
    pub fn issue(&self, names: &[&str]) -> Result<ServerIdentity, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut parameters = leaf_parameters(std::net::IpAddr::from([127, 0, 0, 1]))?;
        parameters.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(address) => Ok(rcgen::SanType::IpAddress(address)),
                Err(_) => Ok(rcgen::SanType::DnsName((*name).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let certificate = parameters.signed_by(&key, &self.certificate, &self.key)?;
        Ok(ServerIdentity::from_parts(&certificate, &key))
    }
}
