//! TLS for HTTP and gRPC (rustls): the server's certificate, reloaded from its files without a
//! restart, and — with `tls.client_ca` — mutual TLS: a client must present a certificate
//! signed by that CA, and its SANs (DNS names, URIs) become the connection's identity
//! (`auth.mode` `mtls` maps them to grants through the keys file).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
#[error("tls: {0}")]
pub struct TlsError(String);

fn err(path: &Path, what: impl std::fmt::Display) -> TlsError {
    TlsError(format!("{}: {what}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(path, e))?;
    if certs.is_empty() {
        return Err(err(path, "no PEM certificate"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| err(path, e))?
        .ok_or_else(|| err(path, "no PEM private key"))
}

fn certified(cert: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs(cert)?;
    let key = key(key_path)?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| err(key_path, e))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// The current certificate; replaced when its files change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().1.clone())
    }
}

impl Reloading {
    fn modified(&self) -> Option<SystemTime> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        m(&self.cert).max(m(&self.key))
    }

    /// Loads the files again if they changed; a pair that does not load keeps the old one.
    fn reload(&self) {
        let modified = self.modified();
        if modified == self.current.read().0 {
            return;
        }
        match certified(&self.cert, &self.key) {
            Ok(k) => {
                *self.current.write() = (modified, k);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate changed but does not load; keeping the old one")
            }
        }
    }
}

impl rustls::client::ResolvesClientCert for Reloading {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().1.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate of `cert`/`key`, checked again every `every` (no restart needed).
fn reloading(cert: &Path, key_path: &Path, every: Duration) -> Result<Arc<Reloading>, TlsError> {
    let mut resolver = Reloading {
        cert: cert.to_path_buf(),
        key: key_path.to_path_buf(),
        current: RwLock::new((None, certified(cert, key_path)?)),
    };
    resolver.current.get_mut().0 = resolver.modified();
    let resolver = Arc::new(resolver);
    let every = every.max(Duration::from_millis(100));
    let weak = Arc::downgrade(&resolver);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(r) = weak.upgrade() else { return };
            tokio::task::spawn_blocking(move || r.reload()).await.ok();
        }
    });
    Ok(resolver)
}

/// How a cluster node reaches its peers when `[tls]` is set: HTTPS, verifying the peer's
/// certificate against `cluster.ca` (or `tls.client_ca`), presenting this node's own
/// `[tls]` certificate (reloaded like the server's). `None` without `[tls]`.
pub fn peer_client(config: &quiver_core::Config) -> Result<Option<rustls::ClientConfig>, TlsError> {
    let (Some(cert), Some(key_path), Some(cluster)) =
        (&config.tls.cert, &config.tls.key, &config.cluster)
    else {
        return Ok(None);
    };
    let Some(ca) = cluster.ca.as_ref().or(config.tls.client_ca.as_ref()) else {
        return Err(TlsError("cluster.ca: needed to verify the peers".into()));
    };
    let mut roots = RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| err(ca, e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity = reloading(cert, key_path, config.tls.reload_interval.0)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(identity);
    Ok(Some(client))
}

/// A TLS acceptor whose certificate follows its files.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// Whether clients must present a certificate.
    pub mutual: bool,
}

/// Builds the acceptor from `[tls]` and starts the reload task (every `reload_every`).
pub fn acceptor(config: &quiver_core::config::TlsConfig) -> Result<Option<Tls>, TlsError> {
    let (Some(cert), Some(key_path)) = (&config.cert, &config.key) else {
        return Ok(None);
    };
    let resolver = reloading(cert, key_path, config.reload_interval.0)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(resolver);
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        mutual: config.client_ca.is_some(),
    }))
}

/// The SANs (DNS names and URIs) of a verified client certificate.
pub fn client_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::URI(u) => Some(u.to_string()),
            // In its usual text form ("10.0.0.5", "fd00::5"), as a `[[cert]] san` names it.
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificates_dns_uri_and_ip_sans_are_all_identities() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName("svc.example".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://quiver/payments".try_into().unwrap()),
            rcgen::SanType::IpAddress("10.0.0.5".parse().unwrap()),
            rcgen::SanType::IpAddress("fd00::5".parse().unwrap()),
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            client_sans(cert.der()),
            [
                "svc.example",
                "spiffe://quiver/payments",
                "10.0.0.5",
                "fd00::5"
            ]
        );
        assert!(
            client_sans(&CertificateDer::from(vec![0u8; 8])).is_empty(),
            "not a certificate"
        );
    }
}
