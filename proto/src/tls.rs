//! TLS configuration shared by both planes and the CLI: PEM loading and the
//! rustls server and client configurations keycap uses.
//!
//! One TLS stack: rustls with the `ring` provider, chosen explicitly so a
//! second provider linked in by some dependency can never change what these
//! configurations negotiate. This module builds configurations and
//! completes server handshakes on connections others accepted; it never
//! logs key material.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be built. Messages name the file and
/// what was wrong with it, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read PEM certificates: {reason}")]
    Certificates { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: cannot read a PEM private key: {reason}")]
    PrivateKey { path: PathBuf, reason: String },
    #[error("{path}: a certificate is not usable as a trusted root: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// The crypto provider every keycap TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file (a leaf followed by its chain, or
/// a bundle of CAs).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificates {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::PrivateKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A certificate chain and its private key, read from PEM files.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Identity {
            chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }
}

/// Builds a root store from a PEM bundle of CAs.
pub fn roots_from(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Root {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Which servers a client trusts.
pub enum Trust<'a> {
    /// The system's roots plus, if given, the CAs in this PEM file (how the
    /// proxy trusts vendors: a test CA never replaces the public roots).
    SystemAnd(Option<&'a Path>),
    /// Only the CAs in this PEM file if given, else the system's roots (how
    /// the proxy and the CLI trust the control plane: a private CA is the
    /// whole trust, not an addition to the public roots).
    OnlyOrSystem(Option<&'a Path>),
}

fn system_roots(roots: &mut RootCertStore) {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "could not load some system root certificates");
    }
    // Unparsable system roots are skipped, as every TLS client does: one
    // bad entry in the system store must not disable TLS.
    let (added, skipped) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no system root certificates found: only a configured CA will be trusted");
    }
    if skipped > 0 {
        tracing::debug!(
            added,
            skipped,
            "skipped unparsable system root certificates"
        );
    }
}

/// A client configuration: the given trust and, for mutual TLS, the
/// identity to present. ALPN is left empty for the connector to fill in.
pub fn client_config(
    trust: Trust<'_>,
    identity: Option<Identity>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::SystemAnd(extra) => {
            system_roots(&mut roots);
            if let Some(path) = extra {
                roots.roots.extend(roots_from(path)?.roots);
            }
        }
        Trust::OnlyOrSystem(Some(path)) => roots = roots_from(path)?,
        Trust::OnlyOrSystem(None) => system_roots(&mut roots),
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| TlsError::Config(e.to_string())),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A server configuration offering HTTP/2 and HTTP/1.1 by ALPN. With
/// `client_ca`, clients are asked for a certificate chained to it; the ask
/// is optional at the TLS layer (a client without one still connects) and
/// whoever serves the connection decides which calls need one. A
/// certificate that is presented must verify, or the handshake fails.
pub fn server_config(
    identity: Identity,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(path) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots_from(path)?),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// How long a client gets to complete a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completes the server side of a TLS handshake within
/// `HANDSHAKE_TIMEOUT`. A failed or slow handshake is logged at debug level
/// (it is the client's doing) and yields `None`. Run it in the connection's
/// own task, so it holds up no other client.
pub async fn accept<S>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}
