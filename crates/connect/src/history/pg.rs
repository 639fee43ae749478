//! How the history sink and reader reach PostgreSQL: the connection string, and TLS through
//! rustls (`tokio-postgres-rustls`).
//!
//! # Design constraints
//! - The URL's `sslmode` decides whether TLS is used, as with libpq: `disable` never,
//!   `prefer` (the default) when the server offers it, `require` always (a server without TLS
//!   is refused).
//! - The certificate: with `[history] ca_file`, the server's chain must lead to that CA and
//!   name the host connected to (libpq's `verify-full`); without it the channel is encrypted
//!   but the server unauthenticated (libpq's `require`) — say `ca_file` to stop a man in the
//!   middle.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A PostgreSQL to connect to: its URL and how TLS is checked.
#[derive(Clone)]
pub struct PgEndpoint {
    url: String,
    tls: MakeRustlsConnect,
    verified: bool,
}

impl std::fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        write!(f, "PgEndpoint {{ verified: {} }}", self.verified)
    }
}

impl PgEndpoint {
    /// `ca_file`: PEM certificates the server's chain must lead to (`None`: not checked).
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<PgEndpoint, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match ca_file {
            Some(path) => builder
                .with_root_certificates(roots(path)?)
                .with_no_client_auth(),
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
        };
        Ok(PgEndpoint {
            url: url.to_string(),
            tls: MakeRustlsConnect::new(config),
            verified: ca_file.is_some(),
        })
    }

    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        postgres::Client::connect(&self.url, self.tls.clone())
    }
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("history.ca_file {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("history.ca_file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("history.ca_file {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "history.ca_file {} holds no certificate",
            path.display()
        ));
    }
    Ok(roots)
}

/// libpq's `sslmode=require`: any certificate is taken (the handshake's signatures are still
/// checked, so the channel is sound; who is at the other end is not).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
