//! Light Rust client for keycap's admin gRPC API.
//!
//! Depends only on `keycap-proto` and `tonic`: a service that only calls
//! keycap compiles neither plane, no database driver and no HTTP server.
//! [`Client`] is the typed surface (the operations of the Python and
//! TypeScript SDKs, errors carrying keycap's code); [`AdminClient`] gives
//! the raw generated clients for vendors, keys, audit and admin tokens,
//! each sending the admin token with every call. The `keycap` CLI is built
//! on it.

#![forbid(unsafe_code)]

use std::path::Path;

use keycap_proto::pb::{
    admin_token_service_client::AdminTokenServiceClient,
    approval_service_client::ApprovalServiceClient, audit_service_client::AuditServiceClient,
    credential_service_client::CredentialServiceClient, key_service_client::KeyServiceClient,
    simulate_service_client::SimulateServiceClient, suggest_service_client::SuggestServiceClient,
    vendor_service_client::VendorServiceClient, webhook_service_client::WebhookServiceClient,
};
use keycap_proto::tls::{self, Trust};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

mod client;

pub use client::{base_url, AuditFilter, Client, CreatedKey, Enforce, Error, NewKey, Result};
pub use keycap_proto::pb;
pub use keycap_proto::Micros;

/// Why a connection could not be made. The admin token never appears in it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid control-plane address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("the admin token is not a valid header value")]
    Token,
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot reach the control plane at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// Sends `authorization: Bearer <admin token>` with every call.
#[derive(Clone)]
pub struct AdminAuth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, AdminAuth>;

/// Typed admin clients sharing one connection.
#[derive(Clone)]
pub struct AdminClient {
    pub vendors: VendorServiceClient<Svc>,
    pub keys: KeyServiceClient<Svc>,
    pub audit: AuditServiceClient<Svc>,
    pub admin_tokens: AdminTokenServiceClient<Svc>,
    pub webhooks: WebhookServiceClient<Svc>,
    /// Dry runs of a key's calls (`Simulate`).
    pub simulate: SimulateServiceClient<Svc>,
    pub approvals: ApprovalServiceClient<Svc>,
    /// Policies suggested from a key's observed calls (`SuggestPolicy`).
    pub suggest: SuggestServiceClient<Svc>,
    /// A vendor's credential versions: stage, list, probe, promote.
    pub credentials: CredentialServiceClient<Svc>,
}

impl AdminClient {
    /// Connects to a control plane at `url` (e.g. `http://127.0.0.1:8081`).
    /// An `https://` URL is verified against the CAs in the PEM file `ca`
    /// if given, else against the system's roots.
    pub async fn connect(
        url: &str,
        admin_token: &str,
        ca: Option<&Path>,
    ) -> Result<Self, ConnectError> {
        let address = |source| ConnectError::Address {
            addr: url.to_string(),
            source,
        };
        let tls = tls::client_config(Trust::OnlyOrSystem(ca), None)?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        // gRPC needs HTTP/2, so only `h2` is offered by ALPN.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .wrap_connector(http);
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(address)?;
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|source| ConnectError::Unreachable {
                addr: url.to_string(),
                source,
            })?;
        let mut token: MetadataValue<Ascii> = format!("Bearer {admin_token}")
            .parse()
            .map_err(|_| ConnectError::Token)?;
        token.set_sensitive(true);
        let auth = AdminAuth(token);
        Ok(AdminClient {
            vendors: VendorServiceClient::with_interceptor(channel.clone(), auth.clone()),
            keys: KeyServiceClient::with_interceptor(channel.clone(), auth.clone()),
            audit: AuditServiceClient::with_interceptor(channel.clone(), auth.clone()),
            admin_tokens: AdminTokenServiceClient::with_interceptor(channel.clone(), auth.clone()),
            webhooks: WebhookServiceClient::with_interceptor(channel.clone(), auth.clone()),
            simulate: SimulateServiceClient::with_interceptor(channel.clone(), auth.clone()),
            approvals: ApprovalServiceClient::with_interceptor(channel.clone(), auth.clone()),
            suggest: SuggestServiceClient::with_interceptor(channel.clone(), auth.clone()),
            credentials: CredentialServiceClient::with_interceptor(channel, auth),
        })
    }
}
