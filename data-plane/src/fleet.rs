//! The proxy's side of the fleet API: an authenticated gRPC client to the
//! control plane, the policy watch loop (reconnect with backoff, resume from
//! the last applied version) and the lease calls the budget makes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keycap_proto::pb::{self, fleet_service_client::FleetServiceClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::policy::PolicyCache;

#[derive(Clone)]
pub struct FleetAuth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for FleetAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = FleetServiceClient<InterceptedService<Channel, FleetAuth>>;

/// A cheap-to-clone handle on the control plane's fleet API.
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    pub node_id: String,
}

impl Fleet {
    /// A lazily connected channel to `control_url`: over `tls` (which
    /// carries this node's client certificate, if it has one) when the URL
    /// is `https://`, plain HTTP/2 otherwise.
    pub fn new(
        control_url: &str,
        fleet_token: &str,
        node_id: &str,
        tls: rustls::ClientConfig,
    ) -> anyhow::Result<Self> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        // gRPC needs HTTP/2, so only `h2` is offered by ALPN.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .wrap_connector(http);
        let channel = Endpoint::from_shared(control_url.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(connector);
        let mut value: tonic::metadata::MetadataValue<_> =
            format!("Bearer {fleet_token}").parse()?;
        value.set_sensitive(true);
        Ok(Fleet {
            client: FleetServiceClient::with_interceptor(channel, FleetAuth(value)),
            node_id: node_id.to_string(),
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

/// Follows the control plane's policy stream forever: applies the snapshot
/// and deltas, hands keys that went away to `on_gone`, reconnects with
/// capped exponential backoff and resumes from the last applied version.
pub async fn watch_policy(
    fleet: Fleet,
    cache: Arc<PolicyCache>,
    on_gone: impl Fn(Vec<String>) + Send + Sync + 'static,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let from_version = cache.version();
        let mut client = fleet.client();
        let req = pb::WatchPolicyRequest {
            node_id: fleet.node_id.clone(),
            from_version,
        };
        match client.watch_policy(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            backoff = Duration::from_millis(50);
                            let gone = cache.apply(update);
                            if !gone.is_empty() {
                                on_gone(gone);
                            }
                        }
                        Ok(None) => break,
                        Err(s) => {
                            if s.code() == Code::OutOfRange {
                                // Our version is gone from the log: start
                                // over from a snapshot.
                                cache.reset_version();
                            }
                            tracing::warn!(code = ?s.code(), "policy stream ended");
                            break;
                        }
                    }
                }
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), message = s.message(), "cannot watch policy")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Tells the control plane the policy version this proxy has applied (see
/// `PolicyCache::subscribe_applied`), so a revocation returns once every
/// proxy refuses the key. Runs beside the watch loop and never holds it up:
/// versions applied while an acknowledgement is on its way collapse into
/// the latest, which is retried with capped backoff until it lands.
pub async fn acknowledge_policy(fleet: Fleet, mut applied: tokio::sync::watch::Receiver<i64>) {
    let mut backoff = Duration::from_millis(50);
    let mut failed = false;
    loop {
        if !failed && applied.changed().await.is_err() {
            return;
        }
        let version = *applied.borrow_and_update();
        let mut req = Request::new(pb::AckPolicyRequest {
            node_id: fleet.node_id.clone(),
            version,
        });
        req.set_timeout(Duration::from_secs(2));
        match fleet.client().ack_policy(req).await {
            Ok(_) => {
                failed = false;
                backoff = Duration::from_millis(50);
            }
            // A control plane from before acknowledgements (during a
            // rolling upgrade): retrying cannot help; the next update tries
            // again.
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::debug!(
                    version,
                    "the control plane takes no policy acknowledgements"
                );
                failed = false;
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), version, "cannot acknowledge the policy version");
                failed = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// What the budget needs from the control plane; a trait so the budget's
/// tests can use an in-memory ledger.
#[async_trait]
pub trait LeaseSource: Send + Sync + 'static {
    async fn grant(&self, req: pb::GrantLeaseRequest) -> Result<pb::GrantLeaseResponse, Status>;
    async fn give_back(&self, lease_id: &str, spent_micros: i64) -> Result<(), Status>;
    /// Gives back what an open lease holds beyond `keep_micros`, if its
    /// total grant is still `granted_micros`; the lease stays open.
    async fn shrink(
        &self,
        lease_id: &str,
        granted_micros: i64,
        keep_micros: i64,
    ) -> Result<(), Status>;
}

#[async_trait]
impl LeaseSource for Fleet {
    async fn grant(&self, req: pb::GrantLeaseRequest) -> Result<pb::GrantLeaseResponse, Status> {
        let mut c = self.client();
        let mut r = Request::new(req);
        r.set_timeout(Duration::from_secs(3));
        Ok(c.grant_lease(r).await?.into_inner())
    }

    async fn give_back(&self, lease_id: &str, spent_micros: i64) -> Result<(), Status> {
        let mut c = self.client();
        c.return_lease(pb::ReturnLeaseRequest {
            lease_id: lease_id.to_string(),
            spent_micros,
            node_id: self.node_id.clone(),
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    async fn shrink(
        &self,
        lease_id: &str,
        granted_micros: i64,
        keep_micros: i64,
    ) -> Result<(), Status> {
        let mut c = self.client();
        let mut r = Request::new(pb::ReturnLeaseRequest {
            lease_id: lease_id.to_string(),
            spent_micros: keep_micros,
            node_id: self.node_id.clone(),
            keep_open: true,
            granted_micros,
        });
        r.set_timeout(Duration::from_secs(3));
        c.return_lease(r).await?;
        Ok(())
    }
}

/// Where spend events go; a trait so delivery can be tested without a
/// control plane.
#[async_trait]
pub trait SpendSink: Send + Sync + 'static {
    async fn report(&self, events: Vec<pb::SpendEvent>) -> Result<(), Status>;
}

#[async_trait]
impl SpendSink for Fleet {
    async fn report(&self, events: Vec<pb::SpendEvent>) -> Result<(), Status> {
        let mut c = self.client();
        c.report_spend(pb::ReportSpendRequest {
            node_id: self.node_id.clone(),
            events,
        })
        .await?;
        Ok(())
    }
}
