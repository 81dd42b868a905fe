//! TLS on the control plane's listener, and the proxy identity the fleet API
//! checks when mutual TLS is on.
//!
//! The listener asks clients for a certificate chained to `--client-ca` but
//! lets clients without one connect, so admin tools holding only a token
//! keep working. The rule for proxies is applied per call, by the fleet
//! handlers: the connection's certificate must name the node the call is
//! made for. This module never logs or returns certificate contents beyond
//! the DNS names a certificate presents.

use std::sync::Arc;

use keycap_proto::tls::{self as shared, Identity};
use rustls::pki_types::CertificateDer;
use tonic::Status;

use crate::config::ControlConfig;

/// How the fleet API authenticates a proxy beyond the fleet token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetIdentity {
    /// The fleet token alone (plain HTTP, or TLS without `--client-ca`).
    TokenOnly,
    /// The fleet token and a client certificate naming the node.
    ClientCertificate,
}

/// The listener's TLS configuration and what it means for the fleet API.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub fleet: FleetIdentity,
}

impl ServerTls {
    /// `None` when no `--tls-cert` is configured (plain HTTP).
    pub fn from_config(config: &ControlConfig) -> anyhow::Result<Option<ServerTls>> {
        let (cert, key) = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) if config.client_ca.is_some() => {
                anyhow::bail!("--client-ca needs TLS: set --tls-cert and --tls-key too")
            }
            (None, None) => return Ok(None),
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let server =
            shared::server_config(Identity::load(cert, key)?, config.client_ca.as_deref())?;
        Ok(Some(ServerTls {
            config: Arc::new(server),
            fleet: if config.client_ca.is_some() {
                FleetIdentity::ClientCertificate
            } else {
                FleetIdentity::TokenOnly
            },
        }))
    }
}

/// The end-entity certificate a client presented on this connection. The
/// handshake already verified it against `--client-ca`; handlers read it
/// from the request's extensions.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub CertificateDer<'static>);

impl PeerCertificate {
    /// The DNS names in the certificate's subject alternative names.
    fn dns_names(&self) -> Vec<String> {
        match webpki::EndEntityCert::try_from(&self.0) {
            Ok(cert) => cert.valid_dns_names().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The proxy identity rule: the connection carries a client certificate
/// (verified against `--client-ca` during the handshake) and one of its
/// subject-alternative DNS names equals `node_id` (ASCII case-insensitive;
/// a wildcard name never matches). No certificate is UNAUTHENTICATED; a
/// certificate for another node is PERMISSION_DENIED.
pub fn check_node(peer: Option<&PeerCertificate>, node_id: &str) -> Result<(), Status> {
    let Some(peer) = peer else {
        tracing::warn!(node = %node_id, "fleet call refused: no client certificate");
        return Err(Status::unauthenticated(
            "the fleet API requires a client certificate issued by the control plane's client CA",
        ));
    };
    let names = peer.dns_names();
    if names.iter().any(|n| n.eq_ignore_ascii_case(node_id)) {
        return Ok(());
    }
    tracing::warn!(node = %node_id, certificate_names = ?names, "fleet call refused: client certificate names another node");
    Err(Status::permission_denied(format!(
        "the client certificate does not name node {node_id:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keycap_tests::pki::TestCa;
    use tonic::Code;

    fn peer(ca: &TestCa, dns_name: &str) -> PeerCertificate {
        let files = ca.client(dns_name);
        let chain = shared::load_certs(&files.cert).unwrap();
        PeerCertificate(chain[0].clone())
    }

    #[test]
    fn no_certificate_is_unauthenticated() {
        let refused = check_node(None, "node-1.proxy.keycap").unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert!(refused.message().contains("client certificate"));
    }

    #[test]
    fn a_certificate_must_name_the_node_exactly() {
        let ca = TestCa::new("unit");
        let node1 = peer(&ca, "node-1.proxy.keycap");
        assert!(check_node(Some(&node1), "node-1.proxy.keycap").is_ok());
        assert!(check_node(Some(&node1), "NODE-1.proxy.keycap").is_ok());
        for other in ["node-2.proxy.keycap", "node-1", "proxy.keycap", ""] {
            let refused = check_node(Some(&node1), other).unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied, "{other:?}");
        }
    }

    #[test]
    fn a_wildcard_certificate_names_no_node() {
        let ca = TestCa::new("unit");
        let wildcard = peer(&ca, "*.proxy.keycap");
        let refused = check_node(Some(&wildcard), "node-1.proxy.keycap").unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied);
    }

    fn config(cert: bool, client_ca: bool, ca: &TestCa) -> ControlConfig {
        let server = ca.server("control");
        ControlConfig {
            metrics_listen: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            database_url: "sqlite::memory:".into(),
            master_key: None,
            master_key_file: None,
            previous_master_keys: Vec::new(),
            previous_master_key_files: Vec::new(),
            admin_token: None,
            fleet_token: String::new(),
            key_env: "test".into(),
            change_poll_ms: 250,
            change_log_keep: 100_000,
            ack_timeout_ms: 2000,
            audit_retention_days: None,
            allow_private_upstreams: false,
            allow_private_webhooks: false,
            webhook_timeout_ms: 10_000,
            rotation_check_ms: 60_000,
            no_webhook_deliveries: false,
            tls_cert: cert.then(|| server.cert.clone()),
            tls_key: cert.then(|| server.key.clone()),
            client_ca: client_ca.then(|| ca.ca_pem()),
            approvals: Default::default(),
        }
    }

    #[test]
    fn client_certificates_are_checked_only_with_a_client_ca() {
        let ca = TestCa::new("unit");
        assert!(ServerTls::from_config(&config(false, false, &ca))
            .unwrap()
            .is_none());
        let plain_tls = ServerTls::from_config(&config(true, false, &ca))
            .unwrap()
            .unwrap();
        assert_eq!(plain_tls.fleet, FleetIdentity::TokenOnly);
        let mutual = ServerTls::from_config(&config(true, true, &ca))
            .unwrap()
            .unwrap();
        assert_eq!(mutual.fleet, FleetIdentity::ClientCertificate);
        let err = ServerTls::from_config(&config(false, true, &ca))
            .err()
            .expect("--client-ca without TLS is refused");
        assert!(err.to_string().contains("--client-ca"), "{err}");
    }
}
