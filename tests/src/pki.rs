//! A throwaway certificate authority for TLS tests: generated per test run
//! into a temporary directory, it issues server certificates for
//! `127.0.0.1`/`localhost` and client certificates naming proxy node ids.
//! Nothing here is trusted outside the test that made it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// A certificate and its key as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test CA and the directory holding everything it issued.
pub struct TestCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: Arc<TempDir>,
}

impl TestCa {
    /// A new CA called `name` (also the prefix of the files it writes).
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("keycap-e2e-pki-")
            .tempdir()
            .expect("pki tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("keycap test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        std::fs::write(dir.path().join(format!("{name}-ca.pem")), issuer.pem()).expect("write CA");
        TestCa {
            name: name.to_string(),
            issuer,
            dir: Arc::new(dir),
        }
    }

    /// The CA certificate (PEM), for `--client-ca`, `--control-ca`,
    /// `--upstream-ca`, `--ca`.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.pem", self.name))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self, file_stem: &str) -> CertFiles {
        self.issue(
            file_stem,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose only DNS name is `dns_name` (a proxy's
    /// node id).
    pub fn client(&self, dns_name: &str) -> CertFiles {
        self.issue(
            &format!("client-{dns_name}"),
            vec![dns_name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn issue(&self, stem: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> CertFiles {
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, stem.to_string());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{stem}.pem")),
            key: self.dir.path().join(format!("{stem}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A rustls server configuration for `127.0.0.1` signed by this CA
    /// (for in-process test servers such as the mock vendor).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let files = self.server("in-process-server");
        let identity = keycap_proto::tls::Identity::load(&files.cert, &files.key)
            .expect("load test server identity");
        Arc::new(keycap_proto::tls::server_config(identity, None).expect("test server config"))
    }
}
